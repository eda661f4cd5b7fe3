"""docs/library.md runs as written: its Python blocks (the TorchRec pipeline example, the encoder alone) are
executed in fresh processes, and the top-level package exports its public API lazily."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "library.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.DOTALL | re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(code: str, tmp_path: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``code`` as a script in a fresh process (killed after ``timeout`` s: the examples must stay quick)."""
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_doc_has_the_two_examples() -> None:
    blocks = python_blocks()
    assert len(blocks) == 2
    pipeline, encoder = blocks
    for needle in ('init_process_group("gloo", rank=0, world_size=1)', "DistributedModelParallel(",
                   "TrainPipelineSparseDist(", "KeyedJaggedTensor.from_lengths_sync(",
                   "from ssd4rec_torchrec import "):
        assert needle in pipeline
    assert "from ssd4rec_torchrec import BiSSDEncoder, EncoderConfig" in encoder


def test_pipeline_example_trains(tmp_path: Path) -> None:
    """One gloo rank: DMP-sharded SSD4Rec driven by TrainPipelineSparseDist on a fixed batch; the loss falls."""
    proc = _run(python_blocks()[0], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = re.search(r"^loss (\d+\.\d+) -> (\d+\.\d+)$", proc.stdout, re.MULTILINE)
    assert m, proc.stdout
    first, last = float(m.group(1)), float(m.group(2))
    assert last < 0.5 * first  # 10 steps on one batch: the model fits it


def test_encoder_example_runs(tmp_path: Path) -> None:
    proc = _run(python_blocks()[1], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_public_api_is_lazy_and_complete() -> None:
    code = (
        "import sys, ssd4rec_torchrec as p, ssd4rec_torchrec.ops\n"
        "assert 'torchrec' not in sys.modules, 'ops pulled in torchrec'\n"
        "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert p.SSD4Rec.__module__ == 'ssd4rec_torchrec.model'\n"
        "assert set(p.__all__) <= set(dir(p))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import ssd4rec_torchrec

    with pytest.raises(AttributeError):
        ssd4rec_torchrec.not_a_name  # noqa: B018
