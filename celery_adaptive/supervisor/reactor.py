"""Where the supervisor's I/O and timers run: Celery's event loop, or a thread of its own.

The supervisor's state has one owner at a time:

- **hub mode** (Celery runs an event loop, the usual case): every child's result pipe and
  sentinel is a reader on Celery's hub, the earliest deadline is one hub timer, and the
  supervisor runs on the hub's thread, as prefork's AsynPool does. No thread of ours exists.
- **thread mode** (before the hub is attached, and for transports without an event loop):
  one thread polls the same descriptors and runs the supervisor under its lock.
- **standalone** (shutdown, once the hub no longer polls): the caller of `poll_once` drives.

Other threads (the backlog probe, the metrics sampler) never touch the supervisor's state:
they `post` a callback, which the owner runs. `post` takes no lock (``SimpleQueue.put`` is
reentrant) and wakes the owner through a pipe, so it is safe from signal handlers too.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
from collections.abc import Callable
from typing import Any, Protocol

from celery_adaptive.clock import Clock

logger = logging.getLogger("celery_adaptive.supervisor")

#: Longest single wait of the thread and standalone loops (a bound, not a poll interval).
MAX_WAIT_S = 1.0
#: Posted callbacks run per wake-up before yielding to I/O again.
POSTS_PER_TURN = 10_000


class ReactorClient(Protocol):
    """What the reactor calls on the supervisor (always with the supervisor's lock held)."""

    def on_readable(self, child_id: int) -> None: ...
    def on_writable(self, child_id: int) -> None: ...
    def on_sentinel(self, child_id: int) -> None: ...
    def run_due(self) -> None: ...
    def next_due(self) -> float | None: ...


class Reactor:
    def __init__(self, client: ReactorClient, clock: Clock, lock: threading.RLock) -> None:
        self._client = client
        self._clock = clock
        self.lock = lock
        self.mode = "standalone"
        self._hub: Any = None
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._posts: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._hub_timer: Any = None
        self._hub_timer_due: float | None = None
        self._thread: threading.Thread | None = None
        self._owner_ident: int | None = None
        self.closed = False

    # -- registration (owner only) -------------------------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        if self.mode == "hub":
            self._hub.add_reader(fd, callback)
        else:
            self._wake()

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None and self.mode == "hub":
            self._hub_remove(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        if fd in self._writers:
            return
        self._writers[fd] = callback
        if self.mode == "hub":
            self._hub.add_writer(fd, callback)
        else:
            self._wake()

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None and self.mode == "hub":
            self._hub_remove(fd, writer=True)

    def _hub_remove(self, fd: int, writer: bool = False) -> None:
        try:
            if writer:
                self._hub.remove_writer(fd)
            else:
                self._hub.remove_reader(fd)
        except Exception:  # the hub may already be closed at shutdown
            logger.debug("hub removal of fd %s failed", fd, exc_info=True)

    def wake_at(self, due: float) -> None:
        """The earliest deadline is now ``due``: make sure someone wakes up for it."""
        if self.mode == "hub":
            if self._hub_timer_due is not None and self._hub_timer_due <= due:
                return
            if self._hub_timer is not None:
                self._hub_timer.cancel()
            self._hub_timer_due = due
            self._hub_timer = self._hub.call_later(max(0.0, due - self._clock.now()), self._on_hub_timer)
        else:
            self._wake()

    # -- any thread ----------------------------------------------------------------------
    def post(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the owner. No lock; safe from any thread or a signal handler."""
        self._posts.put(callback)
        self._wake()

    def on_owner_thread(self) -> bool:
        return self._owner_ident is None or threading.get_ident() == self._owner_ident

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are closed

    # -- modes ---------------------------------------------------------------------------
    def start_thread(self) -> None:
        """Thread mode until a hub is attached (or for good, without one)."""
        with self.lock:
            if self.mode != "standalone" or self.closed:
                return
            self.mode = "thread"
            self._thread = threading.Thread(target=self._thread_loop, name="adaptive-io", daemon=True)
            self._owner_ident = None  # the calling thread and the I/O thread share, under the lock
            self._thread.start()

    def attach_hub(self, hub: Any) -> None:
        """Hand everything to Celery's event loop. Called on the hub's thread."""
        with self.lock:
            if self.closed:
                return
            if self.mode == "hub" and self._hub is not hub:
                self._detach_hub()
            self.mode = "hub"
            self._hub = hub
            self._owner_ident = threading.get_ident()
            hub.add_reader(self._wake_r, self._on_wake)
            for fd, callback in self._readers.items():
                hub.add_reader(fd, callback)
            for fd, callback in self._writers.items():
                hub.add_writer(fd, callback)
            self._hub_timer_due = None
            # The thread sees the new mode at its next turn and ends without touching anything.
            self._thread = None
            due = self._client.next_due()
            if due is not None:
                self.wake_at(due)
        self._wake()  # the thread's poll, and anything posted meanwhile

    def go_standalone(self) -> None:
        """The hub no longer polls (shutdown): the caller drives with `poll_once`. Never waits
        for the I/O thread (it may be waiting for the lock this caller holds): the thread sees
        the mode at its next turn and ends without handling anything."""
        with self.lock:
            if self.mode == "hub":
                self._detach_hub()
            self.mode = "standalone"
            self._owner_ident = threading.get_ident()
            self._thread = None
        self._wake()

    def _detach_hub(self) -> None:
        hub = self._hub
        if self._hub_timer is not None:
            self._hub_timer.cancel()
        self._hub_timer = self._hub_timer_due = None
        for fd in [self._wake_r, *self._readers]:
            self._hub_remove(fd)
        for fd in self._writers:
            self._hub_remove(fd, writer=True)
        self._hub = None if hub is None else hub

    def close(self) -> None:
        self.go_standalone()
        with self.lock:
            self.closed = True
            self._readers.clear()
            self._writers.clear()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- running -------------------------------------------------------------------------
    def _on_hub_timer(self) -> None:
        self._hub_timer = self._hub_timer_due = None
        self._client.run_due()

    def _on_wake(self) -> None:
        self._drain_wake_pipe()
        self.run_posts()

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def run_posts(self) -> None:
        for _ in range(POSTS_PER_TURN):
            try:
                callback = self._posts.get_nowait()
            except queue.Empty:
                return
            try:
                callback()
            except Exception:
                logger.exception("Posted pool callback raised")
        self._wake()  # more are left: come back after the I/O

    def _thread_loop(self) -> None:
        me = threading.current_thread()
        while self._thread is me and self.mode == "thread" and not self.closed:
            self.poll_once(MAX_WAIT_S, thread=me)

    def poll_once(self, timeout: float, thread: threading.Thread | None = None) -> None:
        """Wait up to ``timeout`` for I/O or the next deadline, then handle what is ready.
        ``thread``: called by the I/O thread, which hands nothing once it is no longer the owner."""
        with self.lock:
            readers = dict(self._readers)
            writers = dict(self._writers)
            due = self._client.next_due()
        if due is not None:
            timeout = min(timeout, max(0.0, due - self._clock.now()))
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in readers:
            poller.register(fd, select.POLLIN)
        for fd in writers:
            poller.register(fd, select.POLLOUT | (select.POLLIN if fd in readers else 0))
        try:
            ready = poller.poll(max(0.0, timeout) * 1000.0)
        except InterruptedError:
            ready = []
        with self.lock:
            if thread is not None and (self._thread is not thread or self.mode != "thread"):
                return  # the hub (or a shutdown) took over while this thread waited
            for fd, events in ready:
                if fd == self._wake_r:
                    self._drain_wake_pipe()
                    continue
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    reader = self._readers.get(fd)
                    if reader is not None and reader is readers.get(fd):
                        reader()
                if events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    writer = self._writers.get(fd)
                    if writer is not None and writer is writers.get(fd):
                        writer()
            self.run_posts()
            self._client.run_due()
