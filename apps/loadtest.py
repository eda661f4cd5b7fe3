"""Load test of a running recommendation service on loopback: N concurrent keep-alive clients for a bounded time.

  python apps/serve.py --bundle BUNDLE &
  python apps/loadtest.py --url http://127.0.0.1:8000 --concurrency 1 8 32 --seconds 10 --out results/load.json

  python apps/loadtest.py --concurrency 32 --seconds 60 --reload-bundle B2 --sigterm-pid PID --api-key-file KEY

Each client sends POST /recommend with a random realistic history (raw ids drawn by popularity from --bundle's
item ids, else from /metadata's popular ids; lengths uniform in 1..max_history) and waits for the answer
before the next. Reports requests/s, p50/p99 latency, errors and the server's mean micro-batch size per
concurrency level. Only loopback URLs are accepted. Exits 1 if any request failed.

With --reload-bundle, POST /admin/reload {"bundle": B2} is sent halfway through each level, and the level's
requests are also reported by phase: "before" (answered before the reload started), "during" (in flight
while it ran) and "after" (sent after it finished). With --sigterm-pid, the server gets SIGTERM at the end
of the last level while the clients are still sending: every request already sent must be answered 200
(none lost); a request sent after the SIGTERM whose connection is refused or closed counts as "refused".
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = ("127.", "localhost", "::1", "[::1]")


AUTH: dict[str, str] = {}  # {"Authorization": "Bearer KEY"} with --api-key-file


def get_json(host: str, port: int, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET ``path`` (POST ``body`` as JSON when given) and return the JSON answer; RuntimeError unless 200."""
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        if body is None:
            conn.request("GET", path, headers=AUTH)
        else:
            conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **AUTH})
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}: {payload[:300]!r}")
        return json.loads(payload)
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
    auth = b"".join(f"{k}: {v}\r\n".encode() for k, v in AUTH.items())
    writer.write(b"POST /recommend HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
                 + auth + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before an answer")
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


class Run:
    """What the clients of one level record: (start, end) and latency of every answered request, errors, and
    the requests refused once the server stopped accepting (after ``--sigterm-pid``)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.refused = 0
        self.stop_at: float | None = None  # when SIGTERM was sent


async def _client(host: str, port: int, bodies: list[bytes], deadline: float, k: int, seed: int, run: Run) -> None:
    rng = random.Random(seed)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        run.refused += 1
        return
    try:
        while time.perf_counter() < deadline:
            body = bodies[rng.randrange(len(bodies))]
            t0 = time.perf_counter()
            try:
                status, payload = await _post(reader, writer, host, body)
                run.spans.append((t0, time.perf_counter()))
                if status != 200:
                    run.errors.append(f"HTTP {status}: {payload[:200]!r}")
                elif len(json.loads(payload)["items"]) != k:
                    run.errors.append(f"short answer: {payload[:200]!r}")
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                if run.stop_at is not None and t0 >= run.stop_at:  # sent after SIGTERM: not accepted
                    run.refused += 1
                    return
                run.errors.append(f"{type(e).__name__}: {e}")  # a request sent before SIGTERM got no answer
                writer.close()
                if run.stop_at is not None:
                    return
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _summary(spans: list[tuple[float, float]], seconds: float) -> dict[str, Any]:
    """Count, rate and latency percentiles of answered requests (None where there were none)."""
    lat = sorted(end - start for start, end in spans)
    seconds = max(seconds, 0.0)

    def ms(value: float) -> float | None:
        return round(1000 * value, 2) if lat else None

    return {"requests": len(lat), "seconds": round(seconds, 3),
            "requests_per_s": round(len(lat) / seconds, 1) if seconds > 0 else None,
            "p50_ms": ms(_percentile(lat, 0.50)), "p99_ms": ms(_percentile(lat, 0.99)),
            "max_ms": ms(lat[-1] if lat else 0.0)}


async def _reload_later(host: str, port: int, bundle: str, delay: float) -> dict[str, Any]:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    answer = await asyncio.to_thread(get_json, host, port, "/admin/reload", {"bundle": bundle})
    return {"start": t0, "end": time.perf_counter(), "answer": answer}


async def _sigterm_later(pid: int, delay: float, run: Run) -> None:
    await asyncio.sleep(delay)
    run.stop_at = time.perf_counter()
    os.kill(pid, signal.SIGTERM)


async def run_level(host: str, port: int, bodies: list[bytes], concurrency: int, seconds: float, k: int,
                    warmup: float, reload_bundle: str | None = None, sigterm_pid: int | None = None
                    ) -> dict[str, Any]:
    """One concurrency level (after ``warmup`` seconds whose requests are not counted), with an optional hot
    reload halfway and an optional SIGTERM to the server at the end."""
    if warmup > 0:
        await asyncio.gather(*(_client(host, port, bodies, time.perf_counter() + warmup, k, 10_000 + c, Run())
                               for c in range(concurrency)))
    before = get_json(host, port, "/healthz")
    run = Run()
    t0 = time.perf_counter()
    # with a SIGTERM the clients go on until the server closes their connections
    deadline = t0 + seconds + (300.0 if sigterm_pid else 0.0)
    extra = []
    if reload_bundle:
        extra.append(_reload_later(host, port, reload_bundle, seconds / 2))
    if sigterm_pid:
        extra.append(_sigterm_later(sigterm_pid, seconds, run))
    results = await asyncio.gather(*(_client(host, port, bodies, deadline, k, c, run) for c in range(concurrency)),
                                   *extra)
    elapsed = min(time.perf_counter(), (run.stop_at or time.perf_counter())) - t0
    out: dict[str, Any] = {"concurrency": concurrency, **_summary(run.spans, elapsed), "errors": len(run.errors),
                           "error_samples": run.errors[:5]}
    if sigterm_pid:
        out["stopped"] = {"answered_after_sigterm": sum(1 for _, end in run.spans if end >= run.stop_at),
                          "refused": run.refused}
    else:
        after = get_json(host, port, "/healthz")
        batches = after["batches"] - before["batches"]
        out["mean_batch"] = round((after["requests"] - before["requests"]) / batches, 2) if batches else None
    if reload_bundle:
        r = results[concurrency]
        rs, re_ = r["start"], r["end"]
        stop = run.stop_at or float("inf")
        out["reload"] = {"seconds": round(re_ - rs, 3), "bundle": r["answer"]["bundle"]["id"], "phases": {
            "before": _summary([x for x in run.spans if x[1] < rs], rs - t0),
            "during": _summary([x for x in run.spans if x[1] >= rs and x[0] <= re_], re_ - rs),
            "after": _summary([x for x in run.spans if re_ < x[0] < stop], min(t0 + elapsed, stop) - re_),
        }}
    return out


def _batch_cell(level: dict[str, Any]) -> str:
    """The mean micro-batch column: n/a when the server could not be asked (it was stopped by SIGTERM)."""
    mean = level.get("mean_batch")
    return "n/a" if mean is None else f"{mean:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per concurrency level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--bundle", help="draw histories from this bundle's item ids and popularity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key-file", help="send 'Authorization: Bearer <key>' with the key in this file")
    parser.add_argument("--reload-bundle", help="POST /admin/reload with this bundle halfway through each level")
    parser.add_argument("--sigterm-pid", type=int, help="send SIGTERM to this server pid at the end of the last level")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    host, port = url.hostname or "", url.port or 80
    if url.scheme != "http" or not host.startswith(LOOPBACK) or args.seconds <= 0 or min(args.concurrency) < 1:
        parser.error("--url must be http:// on loopback (127.x, localhost, ::1); --seconds and --concurrency > 0")
    if args.api_key_file:
        AUTH["Authorization"] = f"Bearer {Path(args.api_key_file).read_text().strip()}"
    meta = get_json(host, port, "/metadata")
    bodies = make_bodies(meta, args.bundle, 2000, args.k, args.seed)
    levels = [asyncio.run(run_level(host, port, bodies, c, args.seconds, args.k, args.warmup, args.reload_bundle,
                                    args.sigterm_pid if i == len(args.concurrency) - 1 else None))
              for i, c in enumerate(args.concurrency)]
    print(f"{'conc':>5} {'phase':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7} {'batch':>6}")
    for r in levels:
        rows = [("all", r)] + list((r.get("reload") or {}).get("phases", {}).items())
        for phase, p in rows:
            print(f"{r['concurrency']:>5} {phase:>7} {p['requests_per_s'] or 0:>9.1f} {p['p50_ms'] or 0:>8.2f} "
                  f"{p['p99_ms'] or 0:>8.2f} {p['max_ms'] or 0:>8.2f} {r['errors'] if phase == 'all' else '':>7} "
                  f"{_batch_cell(r) if phase == 'all' else '':>6}")
        if "stopped" in r:
            print(f"SIGTERM: {r['stopped']['answered_after_sigterm']} requests answered after it, "
                  f"{r['stopped']['refused']} connections closed or refused")
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
