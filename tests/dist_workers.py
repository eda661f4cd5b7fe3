"""Run a test file's multi-process (gloo) workers from pytest: `python FILE OUT` once per rank.

Each rank gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a free local port) and
OMP_NUM_THREADS=1; its output goes to `OUT/rank{r}.log` (a file, so a chatty worker can never block on
a full pipe). All ranks are killed as soon as one fails or the deadline passes, and the test fails with
every rank's exit code and log tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, out: Path, world: int, timeout_s: float) -> None:
    """Launch `world` ranks of `script` writing into `out`; return when all exited 0, else `pytest.fail`."""
    env = dict(os.environ, WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, script, str(out)], stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    deadline, failed = time.monotonic() + timeout_s, None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for log in logs:
        log.close()
    codes = [p.returncode for p in procs]
    if failed is not None or any(codes):
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n" + (out / f"rank{r}.log").read_text()[-3000:]
                          for r, c in enumerate(codes))
        pytest.fail(f"workers of {Path(script).name} failed ({failed=}, exit codes {codes}):\n{tails}", pytrace=False)
