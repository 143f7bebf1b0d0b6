"""The example project's tasks: CPU-bound, I/O-bound, tenant-keyed, and a burst producer.

The CPU-bound tasks do real work in pure Python or ``hashlib`` (no sleeps pretending to be
work), so the pool's children really compete for CPUs. The I/O-bound task waits the way a slow
HTTP call would: the child is occupied but the CPU is free.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

from example_project.celery import app


def synthetic_image(width: int, height: int, seed: int) -> bytes:
    """A deterministic grayscale image (one byte a pixel), as if decoded from an upload."""
    pixels = bytearray()
    counter = 0
    need = width * height
    prefix = seed.to_bytes(8, "little", signed=False)
    while len(pixels) < need:
        pixels += hashlib.sha256(prefix + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(pixels[:need])


def box_downscale(pixels: bytes, width: int, height: int, factor: int) -> bytes:
    """Shrink by ``factor`` in each direction, averaging each ``factor`` x ``factor`` box."""
    out_w, out_h = width // factor, height // factor
    area = factor * factor
    out = bytearray(out_w * out_h)
    for oy in range(out_h):
        rows = [pixels[(oy * factor + dy) * width:(oy * factor + dy + 1) * width] for dy in range(factor)]
        for ox in range(out_w):
            x0 = ox * factor
            total = 0
            for row in rows:
                total += sum(row[x0:x0 + factor])
            out[oy * out_w + ox] = total // area
    return bytes(out)


@app.task
def resize_image(width: int = 640, height: int = 480, factor: int = 4, seed: int = 0) -> dict[str, Any]:
    """Make a thumbnail: CPU-bound, pure Python (about 50 ms at the default size)."""
    if width < factor or height < factor or factor < 1:
        raise ValueError(f"cannot shrink {width}x{height} by {factor}")
    thumb = box_downscale(synthetic_image(width, height, seed), width, height, factor)
    return {
        "size": [width // factor, height // factor],
        "sha256": hashlib.sha256(thumb).hexdigest(),
    }


@app.task
def hash_password(password: str, iterations: int = 60_000) -> str:
    """Derive a key the way a login endpoint would: CPU-bound inside hashlib."""
    salt = hashlib.sha256(password.encode()).digest()[:16]
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations).hex()


@app.task
def fetch_url(url: str, latency: float = 0.2) -> dict[str, Any]:
    """A slow HTTP-like call: the child waits, the CPU does not work."""
    if latency < 0 or latency > 30:
        raise ValueError(f"latency {latency} outside 0..30 s")
    time.sleep(latency)
    body = hashlib.sha256(url.encode()).hexdigest()
    return {"url": url, "status": 200, "bytes": len(body) * 64}


@app.task
def tenant_report(tenant: str, rows: int = 2000) -> dict[str, Any]:
    """Aggregate one tenant's rows. Sent with an ``affinity`` header naming the tenant, so
    the pool keeps one tenant's reports on the same child (warm caches, no interleaving)."""
    rng = random.Random(f"{tenant}:{rows}")
    totals: dict[str, float] = {}
    for _ in range(rows):
        region = rng.choice(("eu", "us", "apac"))
        totals[region] = totals.get(region, 0.0) + rng.random() * 100
    return {"tenant": tenant, "rows": rows, "totals": {k: round(v, 2) for k, v in totals.items()}}


def submit_tenant_report(tenant: str, rows: int = 2000, **options: Any) -> Any:
    """Send `tenant_report` keyed to its tenant (``headers={"affinity": "tenant-<id>"}``)."""
    headers = dict(options.pop("headers", None) or {})
    headers["affinity"] = f"tenant-{tenant}"
    return tenant_report.apply_async((tenant, rows), headers=headers, **options)


@app.task
def produce_burst(size: int = 40, seed: int | None = None) -> int:
    """The periodic burst producer (see ``beat_schedule``): fans out a mixed batch and returns
    at once. It never waits on the tasks it sends (a task waiting on tasks can deadlock)."""
    from example_project.load import mixed_batch, send_call

    rng = random.Random(seed)
    calls = mixed_batch(rng, max(0, min(int(size), 10_000)))
    for call in calls:
        send_call(app, call)
    return len(calls)
