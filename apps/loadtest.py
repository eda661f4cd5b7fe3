"""Load test of a running recommendation service on loopback: N concurrent keep-alive clients for a bounded time.

  python apps/serve.py --bundle BUNDLE &
  python apps/loadtest.py --url http://127.0.0.1:8000 --concurrency 1 8 32 --seconds 10 --out results/load.json

Each client sends POST /recommend with a random realistic history (raw ids drawn by popularity from --bundle's
item ids, else from /metadata's popular ids; lengths uniform in 1..max_history) and waits for the answer
before the next. Reports requests/s, p50/p99 latency, errors and the server's mean micro-batch size per
concurrency level. Only loopback URLs are accepted. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def get_json(host: str, port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def make_bodies(meta: dict[str, Any], bundle: str | None, count: int, k: int, seed: int) -> list[bytes]:
    """``count`` JSON request bodies with popularity-weighted random histories."""
    rng = random.Random(seed)
    if bundle:
        import numpy as np
        from safetensors.numpy import load_file

        ids = np.load(Path(bundle) / "item_ids.npy", allow_pickle=False).tolist()
        weights = (load_file(str(Path(bundle) / "popularity.safetensors"))["counts"] + 1.0).tolist()
    else:
        ids = meta["popular_item_ids"]
        weights = [1.0] * len(ids)
    max_len = int(meta["max_history"])
    bodies = []
    for _ in range(count):
        history = rng.choices(ids, weights=weights, k=rng.randint(1, max_len))
        bodies.append(json.dumps({"history": history, "k": k, "exclude_seen": True}).encode())
    return bodies


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, body: bytes
                ) -> tuple[int, bytes]:
    writer.write(b"POST /recommend HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _client(host: str, port: int, bodies: list[bytes], deadline: float, k: int, seed: int,
                  latencies: list[float], errors: list[str]) -> None:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            body = bodies[rng.randrange(len(bodies))]
            t0 = time.perf_counter()
            try:
                status, payload = await _post(reader, writer, host, body)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(f"HTTP {status}: {payload[:200]!r}")
                elif len(json.loads(payload)["items"]) != k:
                    errors.append(f"short answer: {payload[:200]!r}")
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_level(host: str, port: int, bodies: list[bytes], concurrency: int, seconds: float, k: int,
                    warmup: float) -> dict[str, Any]:
    """One concurrency level (after ``warmup`` seconds whose requests are not counted)."""
    if warmup > 0:
        await asyncio.gather(*(_client(host, port, bodies, time.perf_counter() + warmup, k, 10_000 + c, [], [])
                               for c in range(concurrency)))
    before = get_json(host, port, "/healthz")
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(host, port, bodies, t0 + seconds, k, c, latencies, errors)
                           for c in range(concurrency)))
    elapsed = time.perf_counter() - t0
    after = get_json(host, port, "/healthz")
    lat = sorted(latencies)
    batches = after["batches"] - before["batches"]
    return {
        "concurrency": concurrency, "requests": len(lat), "seconds": round(elapsed, 3),
        "requests_per_s": round(len(lat) / elapsed, 1), "p50_ms": round(1000 * _percentile(lat, 0.50), 2),
        "p99_ms": round(1000 * _percentile(lat, 0.99), 2), "max_ms": round(1000 * (lat[-1] if lat else 0.0), 2),
        "errors": len(errors), "error_samples": errors[:5],
        "mean_batch": round((after["requests"] - before["requests"]) / batches, 2) if batches else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per concurrency level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--bundle", help="draw histories from this bundle's item ids and popularity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    host, port = url.hostname or "", url.port or 80
    if url.scheme != "http" or not host.startswith(LOOPBACK) or args.seconds <= 0 or min(args.concurrency) < 1:
        parser.error("--url must be http:// on loopback (127.x, localhost, ::1); --seconds and --concurrency > 0")
    meta = get_json(host, port, "/metadata")
    bodies = make_bodies(meta, args.bundle, 2000, args.k, args.seed)
    levels = [asyncio.run(run_level(host, port, bodies, c, args.seconds, args.k, args.warmup))
              for c in args.concurrency]
    print(f"{'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7} {'batch':>6}")
    for r in levels:
        print(f"{r['concurrency']:>5} {r['requests_per_s']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['max_ms']:>8.2f} {r['errors']:>7} {r['mean_batch'] or 0:>6.2f}")
    result = {"url": args.url, "index": meta.get("index"), "num_items": meta.get("num_items"),
              "max_history": meta.get("max_history"), "k": args.k, "seconds": args.seconds, "levels": levels,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r["errors"] for r in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
