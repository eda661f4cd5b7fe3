"""Serve recommendations from an exported bundle over HTTP (FastAPI + uvicorn), micro-batching the user tower.

  python apps/serve.py --bundle BUNDLE                       # http://127.0.0.1:8000, exact index
  python apps/serve.py --bundle BUNDLE --index hnsw --max-batch 64 --max-wait-ms 2 --tower aoti
  python apps/serve.py --bundle BUNDLE --host 0.0.0.0 --api-key-file /run/secrets/ssd4rec_key

Endpoints: POST /recommend {"history": [raw ids, oldest first], "k": 10, "exclude_seen": true},
POST /recommend/batch {"requests": [...]}, GET /healthz, GET /metadata, GET /metrics (Prometheus),
POST /admin/reload {"bundle": PATH}. Binds to 127.0.0.1 unless --host says otherwise. With --api-key-file
every route but /healthz needs "Authorization: Bearer <key>"; without it the admin routes answer only on a
loopback bind. SIGHUP reloads --bundle's path (checked first; a bad bundle is refused and the old one keeps
serving); SIGTERM stops accepting, finishes accepted requests and exits 0 (at most --drain-seconds).
One JSON access-log line per request goes to --access-log (default: stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        print(f"serve: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from ssd4rec_torchrec.bundle import TOWER_KINDS
    from ssd4rec_torchrec.serving.index import INDEX_KINDS
    from ssd4rec_torchrec.serving.service import DEFAULT_MAX_BODY_BYTES

    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle directory written by apps/export.py")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--index", choices=INDEX_KINDS, default="exact",
                        help="exact (canonical top-k, = offline evaluator), flat (FAISS IP), hnsw, ivf (approximate)")
    parser.add_argument("--tower", choices=TOWER_KINDS, default="exported",
                        help="exported (torch.export program, default) or aoti (the AOTInductor package)")
    parser.add_argument("--max-batch", type=int, default=64, help="histories per packed tower call (default 64)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="longest a request waits for others to share its tower call (default 2)")
    parser.add_argument("--max-history", type=int,
                        help="keep the most recent N known items (default: the bundle's window; 4096 for a model "
                             "trained on full histories)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--max-queue", type=int, default=10_000, help="queued requests before 503 (default 10000)")
    parser.add_argument("--request-timeout-ms", type=float,
                        help="answer 503 (with Retry-After) to a request not served within this time (default: none)")
    parser.add_argument("--drain-seconds", type=float, default=10.0,
                        help="on SIGTERM, wait at most this long for accepted requests (default 10)")
    parser.add_argument("--api-key-file", help="file holding the API key (Bearer) for every route but /healthz")
    parser.add_argument("--access-log", default="-", help="JSON access log: a file, '-' for stderr (default), 'off'")
    parser.add_argument("--threads", type=int, help="torch / FAISS intra-op threads (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def _check_args(args: argparse.Namespace) -> str | None:
    """The first bad argument as one line, or None."""
    if not 0 < args.port < 65536:
        return f"--port must be in 1..65535, got {args.port}"
    for name in ("max_batch", "max_body_bytes", "max_queue", "threads", "max_history"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if not args.max_wait_ms >= 0:
        return f"--max-wait-ms must be >= 0, got {args.max_wait_ms}"
    if args.request_timeout_ms is not None and not args.request_timeout_ms > 0:
        return f"--request-timeout-ms must be > 0, got {args.request_timeout_ms}"
    if not args.drain_seconds >= 0:
        return f"--drain-seconds must be >= 0, got {args.drain_seconds}"
    if not (Path(args.bundle) / "manifest.json").is_file():
        return f"--bundle {args.bundle}: not a serving bundle (no manifest.json)"
    return None


def read_api_key(path: str) -> str:
    """The key in ``path`` (surrounding whitespace stripped); ValueError for a missing, unreadable or empty file."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({type(e).__name__})") from None
    if not key or any(c.isspace() for c in key):
        raise ValueError(f"--api-key-file {path}: must hold one key without whitespace")
    return key


def _setup_logging(level: str, access_log: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("ssd4rec_torchrec.serving.access")
    access.propagate = False
    if access_log == "off":
        access.disabled = True
        return
    handler = logging.StreamHandler(sys.stderr) if access_log == "-" else logging.FileHandler(access_log)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    api_key = None
    try:
        if problem:
            raise ValueError(problem)
        if args.api_key_file:
            api_key = read_api_key(args.api_key_file)
        _setup_logging(args.log_level, args.access_log)
    except (ValueError, OSError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    import torch
    import uvicorn

    from ssd4rec_torchrec.serving.reload import ReloadError
    from ssd4rec_torchrec.serving.service import load_service

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    try:
        app = load_service(args.bundle, index=args.index, max_history=args.max_history, tower=args.tower,
                           max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                           max_queue=args.max_queue, api_key=api_key, bind_host=args.host,
                           request_timeout_ms=args.request_timeout_ms, reload_on_sighup=True)
    except (ReloadError, ValueError, ImportError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.drain_seconds)
    # uvicorn handles SIGTERM (stop accepting, finish accepted requests, lifespan shutdown) and then raises the
    # signal again with the handler it found installed; this one makes that a normal exit (status 0).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    logging.getLogger("serve").info("drained and stopped")
    # every accepted request is answered: exit now rather than spend the drain budget on interpreter teardown
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
