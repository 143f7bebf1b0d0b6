"""A forked pool child lets go of the parent's TCP connections before anything else runs."""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any

from celery_adaptive.child import ForkedChildProcess


def _kind(fd: int) -> str:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    return "socket" if stat.S_ISSOCK(mode) else "other"


def _report(conn: Any, fds: dict[str, int]) -> None:
    kinds = {name: _kind(fd) for name, fd in fds.items()}
    # What py-amqp's close does in Celery's after-fork handlers: shut the connection down.
    try:
        socket.socket(fileno=fds["tcp"]).shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.sendall(json.dumps(kinds).encode())


def test_connected_tcp_is_replaced_and_other_sockets_stay() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    report_here, report_there = socket.socketpair()  # a Unix pair, like the child's pipe
    fds = {"tcp": client.fileno(), "listener": listener.fileno(), "unix": report_there.fileno()}
    try:
        child = ForkedChildProcess(target=_report, args=(report_there, fds), daemon=True)
        child.start()
        child.join(30)
        assert child.exitcode == 0
        report_here.settimeout(10)
        seen = json.loads(report_here.recv(4096).decode())
        assert seen == {"tcp": "other", "listener": "socket", "unix": "socket"}
        # The parent's connection survived the child's start and exit.
        client.sendall(b"ping")
        server_side.settimeout(10)
        assert server_side.recv(4) == b"ping"
    finally:
        for sock in (client, server_side, listener, report_here, report_there):
            sock.close()
