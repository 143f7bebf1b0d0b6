"""Broker chores for scripts/celery-conformance.sh (each bounded by a short timeout).

    brokers.py answers URL                  exit 0 when the broker (amqp:// or redis://) answers
    brokers.py redis-db URL DB              print URL with its database number set to DB
    brokers.py flush-redis-db URL DB        empty that database
    brokers.py amqp-vhost URL VHOST         print URL with its virtual host set to VHOST
    brokers.py amqp-user URL                print the URL's user name
    brokers.py api-available URL            exit 0 when RabbitMQ's management API answers on loopback
    brokers.py reset-vhost-api URL VHOST    delete and re-create VHOST through that API
    brokers.py delete-vhost-api URL VHOST   delete VHOST through that API
    brokers.py purge URL                    empty Celery's default queue (when no vhost can be made)
"""

from __future__ import annotations

import base64
import ipaddress
import json
import sys
import urllib.error
import urllib.request
from urllib.parse import quote, unquote, urlsplit, urlunsplit

TIMEOUT = 3.0
MANAGEMENT_PORT = 15672


def _is_redis(url: str) -> bool:
    return urlsplit(url).scheme in ("redis", "rediss")


def answers(url: str) -> bool:
    try:
        if _is_redis(url):
            import redis

            return bool(redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT).ping())
        from kombu import Connection

        with Connection(url, connect_timeout=TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT)
        return True
    except Exception as exc:
        print(f"{url}: {exc!r}", file=sys.stderr)
        return False


def redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def flush_redis_db(url: str, db: int) -> None:
    import redis

    redis.Redis.from_url(redis_db(url, db), socket_timeout=10).flushdb()


def amqp_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))


def amqp_user(url: str) -> str:
    return unquote(urlsplit(url).username or "guest")


def _api(url: str, method: str, path: str) -> int:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise RuntimeError(f"the management API is used on loopback only, not on {host}")
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    request = urllib.request.Request(f"http://{host}:{MANAGEMENT_PORT}/api/{path}", method=method)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("content-type", "application/json")
    if method == "PUT" and path.startswith("permissions/"):
        request.data = json.dumps({"configure": ".*", "write": ".*", "read": ".*"}).encode()
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def api_available(url: str) -> bool:
    try:
        return _api(url, "GET", "overview") == 200
    except Exception:
        return False


def reset_vhost_api(url: str, vhost: str) -> None:
    name = quote(vhost, safe="")
    _api(url, "DELETE", f"vhosts/{name}")
    status = _api(url, "PUT", f"vhosts/{name}")
    if status not in (201, 204):
        raise RuntimeError(f"creating vhost {vhost!r} through the management API gave HTTP {status}")
    status = _api(url, "PUT", f"permissions/{name}/{quote(amqp_user(url), safe='')}")
    if status not in (201, 204):
        raise RuntimeError(f"granting vhost {vhost!r} to {amqp_user(url)} gave HTTP {status}")


def delete_vhost_api(url: str, vhost: str) -> None:
    _api(url, "DELETE", f"vhosts/{quote(vhost, safe='')}")


def purge(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=TIMEOUT) as conn:
        try:
            conn.default_channel.queue_purge("celery")
        except Exception as exc:  # no such queue yet: nothing to purge
            print(f"purge celery queue: {exc!r}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 64
    command, args = argv[0], argv[1:]
    if command == "answers":
        return 0 if answers(args[0]) else 1
    if command == "redis-db":
        print(redis_db(args[0], int(args[1])))
    elif command == "flush-redis-db":
        flush_redis_db(args[0], int(args[1]))
    elif command == "amqp-vhost":
        print(amqp_vhost(args[0], args[1]))
    elif command == "amqp-user":
        print(amqp_user(args[0]))
    elif command == "api-available":
        return 0 if api_available(args[0]) else 1
    elif command == "reset-vhost-api":
        reset_vhost_api(args[0], args[1])
    elif command == "delete-vhost-api":
        delete_vhost_api(args[0], args[1])
    elif command == "purge":
        purge(args[0])
    else:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 64
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
