"""`apps/train.py` with every SSD scan replaced by its D skip: the `train` suite's `--scan-free` floor.

Launched by the suite as `torch.distributed.run -m ssd4rec_torchrec.bench.scan_free_train ARGS` (ARGS as for
apps/train.py). The job trains a model that is not SSD4Rec (no state passing); it only measures how fast the
rest of the training step (embeddings, projections, conv, norms, FFN, loss, optimizers, communication) runs.
"""

from __future__ import annotations

from ssd4rec_torchrec.runtime import tune_malloc

if __name__ == "__main__":
    tune_malloc()  # re-exec now (as apps/train.py would), before the scan override below is entered

    import json
    import os
    import runpy
    import sys
    from pathlib import Path

    from ssd4rec_torchrec.bench.common import scan_free

    script = Path(__file__).resolve().parents[2] / "apps" / "train.py"
    sys.argv[0] = str(script)
    with scan_free() as override:
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            marker = os.environ.get("SSD4REC_SCAN_FREE_MARKER")
            if marker:  # proof for the suite that the replacement was really used, per rank
                Path(f"{marker}.{os.environ.get('RANK', '0')}").write_text(json.dumps({"scan_calls": override.calls}))
