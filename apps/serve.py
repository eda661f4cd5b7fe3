"""Serve recommendations from an exported bundle over HTTP (FastAPI + uvicorn), micro-batching the user tower.

  python apps/serve.py --bundle BUNDLE                       # http://127.0.0.1:8000, exact index
  python apps/serve.py --bundle BUNDLE --index hnsw --max-batch 64 --max-wait-ms 2

Endpoints: POST /recommend {"history": [raw ids, oldest first], "k": 10, "exclude_seen": true},
POST /recommend/batch {"requests": [...]}, GET /healthz, GET /metadata. Binds to 127.0.0.1 unless --host says
otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from ssd4rec_torchrec.serving.index import INDEX_KINDS
    from ssd4rec_torchrec.serving.service import DEFAULT_MAX_BODY_BYTES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle directory written by apps/export.py")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--index", choices=INDEX_KINDS, default="exact",
                        help="exact (canonical top-k, = offline evaluator), flat (FAISS IP), hnsw, ivf (approximate)")
    parser.add_argument("--max-batch", type=int, default=64, help="histories per packed tower call (default 64)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="longest a request waits for others to share its tower call (default 2)")
    parser.add_argument("--max-history", type=int, help="keep the most recent N known items (default: the bundle's)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--max-queue", type=int, default=10_000, help="queued requests before 503 (default 10000)")
    parser.add_argument("--threads", type=int, help="torch / FAISS intra-op threads (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from ssd4rec_torchrec.serving.bundle_io import BundleError
    from ssd4rec_torchrec.serving.service import load_service

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    try:
        app = load_service(args.bundle, index=args.index, max_history=args.max_history, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue)
    except (BundleError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
