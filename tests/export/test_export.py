"""apps/export.py on a real tiny run: tower parity (exported and AOTI) with the eager model, exact item table,
checksums, quantisation recall, a bundle loaded without torchrec or the model code, and CLI errors.
The tower's append-mask read-out and other encoder variants are checked on random encoders (no run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ssd4rec_torchrec.bundle import BundleError, load_bundle, load_item_table, read_manifest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "data.synthetic.num_users=300", "train.epochs=1", "train.batch_size=64"]
TOL = 1e-5


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL],
                   cwd=REPO, env=_env(), check=True, capture_output=True, timeout=900)
    return run


@pytest.fixture(scope="module")
def bundle(run_dir) -> Path:
    out = run_dir.parent / "bundle"
    res = subprocess.run([sys.executable, "apps/export.py", "--run", str(run_dir), "--out", str(out)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _packed(lengths: list[int], num_items: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)
    return torch.randint(1, num_items + 1, (int(offsets[-1]),), generator=g), offsets


CASES = [[1], [50], [1, 1], [3, 17, 1, 40, 2, 9, 50], [50] * 33, [1] * 70, [33, 32, 31, 64, 65]]


@pytest.fixture(scope="module")
def eager(bundle, run_dir, tmp_path_factory):
    """Eager (DMP) user vectors of every CASES batch, in one worker subprocess."""
    n = read_manifest(bundle)["num_items"]
    parts = [_packed(lens, n, seed) for seed, lens in enumerate(CASES)]
    values = torch.cat([v for v, _ in parts])
    lengths = torch.cat([o.diff() for _, o in parts])
    d = tmp_path_factory.mktemp("eager")
    save_file({"values": values, "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])},
              str(d / "hist.safetensors"))
    res = subprocess.run([sys.executable, "tests/export/eager_worker.py", str(run_dir), str(d / "hist.safetensors"),
                          str(d / "out.safetensors")], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = load_file(str(d / "out.safetensors"))
    sizes = [len(c) for c in CASES]
    out["per_case"] = list(torch.split(out["vectors"], sizes))
    out["parts"] = parts
    return out


@pytest.mark.parametrize("kind", ["exported", "aoti"])
def test_tower_equals_eager_user_vectors(bundle, eager, kind):
    b = load_bundle(bundle, tower=kind)
    assert b.tower_kind == kind
    worst = 0.0
    for (values, offsets), ref in zip(eager["parts"], eager["per_case"]):
        got = b.user_vectors(values, offsets)
        assert got.shape == ref.shape and got.dtype == torch.float32
        worst = max(worst, float((got - ref).abs().max()))
    assert worst <= TOL, worst
    # every case again in one call: packing several histories changes nothing
    values = torch.cat([v for v, _ in eager["parts"]])
    lengths = torch.cat([o.diff() for _, o in eager["parts"]])
    got = b.user_vectors(values, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
    assert float((got - eager["vectors"]).abs().max()) <= TOL


def test_item_table_equals_checkpoint_rows(bundle, eager):
    m = read_manifest(bundle)
    items, scales = load_item_table(bundle, "fp32")
    assert scales is None and items.dtype == torch.float32
    assert items.shape == (m["num_items"], m["d_model"])
    assert torch.equal(items, eager["items"])  # bit for bit (tiny config: no L2 normalisation)
    table = torch.export.load(str(bundle / "user_tower.pt2")).module().state_dict()["item_embedding.weight"]
    assert torch.equal(table[1:m["num_items"] + 1], eager["items"])
    assert torch.equal(table[m["mask_index"]], eager["mask_row"][0])
    ids = np.load(bundle / "item_ids.npy", allow_pickle=False)
    assert len(ids) == m["num_items"]
    pop = load_file(str(bundle / "popularity.safetensors"))["counts"]
    assert pop.dtype == torch.float64 and pop.shape == (m["num_items"],) and float(pop.sum()) > 0


def test_manifest_and_quantised_tables(bundle):
    m = read_manifest(bundle)
    assert m["format_version"] == 1 and m["objective"] == "prefix" and m["readout"] == "last"
    assert m["mask_index"] == m["num_items"] + 1 and m["max_history"] == 50 and m["l2_normalize"] is False
    assert m["config"]["model"]["d_model"] == m["d_model"] and m["metrics"]["filtered"]["count"] > 0
    assert set(m["versions"]) == {"torch", "torchrec", "ssd4rec_torchrec", "python"}
    assert set(m["files"]) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert m["user_tower"]["aoti"]["present"] is True
    assert max(m["user_tower"]["parity_max_abs_diff"][k] for k in ("exported", "aoti")) <= TOL
    for dt in ("bf16", "int8"):
        r = m["quantization_recall"][dt]["recall@10"]
        assert 0.0 <= r <= 1.0
    assert m["quantization_recall"]["int8"]["recall@10"] > 0.9  # per-row int8 barely moves a top-10
    fp32, _ = load_item_table(bundle, "fp32")
    bf16, _ = load_item_table(bundle, "bf16")
    q, scales = load_item_table(bundle, "int8")
    assert bf16.dtype == torch.bfloat16 and q.dtype == torch.int8 and scales.shape == (m["num_items"],)
    assert torch.equal(bf16, fp32.to(torch.bfloat16))
    assert bool(((q.float() * scales[:, None] - fp32).abs() <= scales[:, None] / 2 + 1e-7).all())
    assert not list(bundle.parent.glob("bundle.tmp-*"))


def test_corrupted_file_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    p = copy / "items_fp32.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"items_fp32\.safetensors does not match its manifest checksum"):
        load_bundle(copy)
    p.write_bytes(bytes(data[:-4]))
    with pytest.raises(BundleError, match=r"items_fp32\.safetensors has \d+ bytes"):
        load_bundle(copy)
    p.unlink()
    with pytest.raises(BundleError, match=r"items_fp32\.safetensors is listed in the manifest but missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path)


ISOLATED = """
import sys, torch
from ssd4rec_torchrec.bundle import load_bundle
b = load_bundle(sys.argv[1], tower=sys.argv[2])
v = b.encode([[1, 2, 3], [5], list(range(1, 80))])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "fbgemm_gpu")
               or m.startswith(("ssd4rec_torchrec.model", "ssd4rec_torchrec.nn", "ssd4rec_torchrec.ops",
                                "ssd4rec_torchrec.train", "ssd4rec_torchrec.data", "ssd4rec_torchrec.export.tower")))
print(heavy)
print(b.tower_kind, tuple(v.shape), float(v.abs().sum()))
"""


@pytest.mark.parametrize("kind", ["exported", "aoti"])
def test_bundle_loads_without_torchrec_or_model_code(bundle, kind):
    res = subprocess.run([sys.executable, "-c", ISOLATED, str(bundle), kind], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    heavy, line = res.stdout.strip().splitlines()[-2:]
    assert heavy == "[]", heavy
    kind_out, _, rest = line.partition(" ")
    assert kind_out == kind
    b = load_bundle(bundle, tower="exported")
    ref = b.encode([[1, 2, 3], [5], list(range(1, 80))])
    assert rest.startswith("(3, 32)")
    assert float(rest.rsplit(" ", 1)[1]) == pytest.approx(float(ref.abs().sum()), abs=1e-3)


def test_bundle_checks_tower_inputs(bundle):
    b = load_bundle(bundle, tower="exported")
    n = b.num_items
    with pytest.raises(ValueError, match="item indices must be in"):
        b.user_vectors(torch.tensor([1, n + 1]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="empty history"):
        b.user_vectors(torch.tensor([1]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="offsets must"):
        b.user_vectors(torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert b.index_of([b.item_ids[0], b.item_ids[-1], "nope", -12345]).tolist() == [1, n, 0, 0]


def test_cli_errors_are_one_line(run_dir, bundle, tmp_path):
    cases = [
        (["--run", str(run_dir), "--out", str(tmp_path / "x"), "--dtypes", "fp32,fp16"], "unknown dtype 'fp16'"),
        (["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "not a run directory"),
        (["--run", str(run_dir), "--out", str(bundle)], "already exists"),
        (["--run", str(run_dir), "--out", str(tmp_path / "x"), "--checkpoint", str(tmp_path)], "no"),
        (["--run", str(run_dir), "--out", str(tmp_path / "x"), "--parity-users", "0"], "--parity-users"),
        (["--run", str(run_dir)], "--out"),
    ]
    for args, expected in cases:
        res = subprocess.run([sys.executable, "apps/export.py", *args], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 2, (args, res.stderr[-1000:])
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("export: error:") and expected in lines[0], lines
        assert not (tmp_path / "x").exists()
    res = subprocess.run([sys.executable, "apps/export.py", "--help"], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "--no-aoti" in res.stdout


def test_no_aoti_fp32_only_and_force(run_dir, bundle, tmp_path):
    out = tmp_path / "b2"
    out.mkdir()
    (out / "stale").write_text("x")
    res = subprocess.run([sys.executable, "apps/export.py", "--run", str(run_dir), "--out", str(out), "--no-aoti",
                          "--dtypes", "fp32", "--force", "--checkpoint", "latest"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["user_tower"]["aoti"] == {"present": False, "file": None, "reason": "skipped (--no-aoti)"}
    assert m["item_vectors"] == {"fp32": "items_fp32.safetensors"} and m["quantization_recall"] == {}
    assert sorted(p.name for p in out.iterdir()) == sorted([*m["files"], "manifest.json"])
    b = load_bundle(out)
    assert b.tower_kind == "exported"
    with pytest.raises(BundleError, match="no AOTInductor package"):
        load_bundle(out, tower="aoti")


def test_bf16_trained_run_exports_in_fp32(tmp_path):
    """`model.autocast: bf16` only speeds up training: in eval mode the encoder runs fp32, so the export's eager
    reference matches the fp32 tower to the usual tolerance."""
    run = tmp_path / "run"
    subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL,
                    "model.autocast=bf16"], cwd=REPO, env=_env(), check=True, capture_output=True, timeout=900)
    out = tmp_path / "bundle"
    res = subprocess.run([sys.executable, "apps/export.py", "--run", str(run), "--out", str(out), "--no-aoti",
                          "--dtypes", "fp32"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["user_tower"]["parity_max_abs_diff"]["exported"] <= TOL


# --- the tower on random encoders: read-outs and encoder variants the tiny run does not cover -------------------


def _eager_readout(encoder, table, values, offsets, n, append_mask, l2):
    segs = list(torch.split(values, offsets.diff().tolist()))
    if append_mask:
        segs = [torch.cat([s, torch.tensor([n + 1])]) for s in segs]
    lens = torch.tensor([len(s) for s in segs])
    off = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    with torch.no_grad():
        user = encoder(table[torch.cat(segs)], off)[off[1:] - 1]
    return torch.nn.functional.normalize(user, dim=-1) if l2 else user


@pytest.mark.parametrize("variant", [
    {"readout": "append_mask", "l2": True},
    {"readout": "last", "l2": False, "positional": "learned", "flip_back": False, "share_backward_weights": False},
    {"readout": "last", "l2": False, "flip_back": False, "backward_scope": "prefix", "beta": 0.5},
    {"readout": "last", "l2": True, "flip_back": False, "backward_scope": "prefix", "share_backward_weights": False},
])
def test_exported_tower_variants(variant):
    from ssd4rec_torchrec.export.tower import UserTower
    from ssd4rec_torchrec.export.writer import export_tower
    from ssd4rec_torchrec.nn import BiSSDEncoder

    variant = dict(variant)
    readout, l2 = variant.pop("readout"), variant.pop("l2")
    torch.manual_seed(0)
    n = 60
    enc = BiSSDEncoder(32, 2, d_state=16, headdim=16, chunk_size=8, dropout=0.3, kernel="torch",
                       max_positions=40, **variant).eval()
    table = torch.randn(n + 2, 32)
    tower = UserTower(table, enc, num_items=n, readout=readout, l2_normalize=l2).eval()
    program = export_tower(tower, _packed([5, 9, 3], n, 0)).module()
    for seed, lengths in enumerate([[1], [2], [1, 1], [7, 1, 30, 8, 64], [50] * 9]):
        values, offsets = _packed(lengths, n, seed)
        ref = _eager_readout(enc, table, values, offsets, n, readout == "append_mask", l2)
        with torch.no_grad():
            assert float((tower(values, offsets) - ref).abs().max()) <= TOL
            assert float((program(values, offsets) - ref).abs().max()) <= TOL
    if readout == "append_mask":  # an empty history is just the mask token
        values, offsets = torch.tensor([3, 4], dtype=torch.int64), torch.tensor([0, 0, 2])
        ref = _eager_readout(enc, table, values, offsets, n, True, l2)
        with torch.no_grad():
            assert float((program(values, offsets) - ref).abs().max()) <= TOL


@pytest.mark.slow
def test_two_rank_export_equals_one_rank(run_dir, bundle, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "b2"
    res = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "apps/export.py", "--run-dir",
                          str(run_dir), "--out", str(out), "--no-aoti", "--dtypes", "fp32"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = load_bundle(bundle, tower="exported"), load_bundle(out)
    assert torch.equal(one.item_vectors, two.item_vectors)  # each rank wrote its own shard of the table
    histories = [[1, 2, 3], [4] * 60, [7]]
    assert torch.equal(one.encode(histories), two.encode(histories))


@pytest.mark.parametrize("model,objective,history", [("sasrec", "next", "null"), ("bert4rec", "cloze", "12")])
def test_transformer_baselines_export_and_serve(tmp_path, model, objective, history):
    """SASRec and BERT4Rec export like SSD4Rec: the tower reads the most recent ``max_history`` items (the
    training window; ``model.max_positions`` when the run trained on full histories), agrees with the eager
    model there, and the bundle serves."""
    from fastapi.testclient import TestClient

    from ssd4rec_torchrec.serving.service import load_service

    run, out = tmp_path / "run", tmp_path / "bundle"
    subprocess.run([sys.executable, "apps/train.py", "--config", "configs/tiny.yaml", "--run-dir", str(run), *SMALL,
                    f"model.name={model}", f"objective.name={objective}", f"objective.max_history={history}",
                    "model.max_positions=16"], cwd=REPO, env=_env(), check=True, capture_output=True, timeout=900)
    res = subprocess.run([sys.executable, "apps/export.py", "--run", str(run), "--out", str(out), "--no-aoti",
                          "--dtypes", "fp32"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    window = 16 if history == "null" else int(history)
    assert m["max_history"] == window and m["readout"] == ("last" if model == "sasrec" else "append_mask")
    assert m["user_tower"]["parity_max_abs_diff"]["exported"] <= TOL
    b = load_bundle(out)
    values, offsets = _packed([window + 9, 3], b.num_items, seed=0)
    cut = torch.cat([values[9:window + 9], values[window + 9:]])
    assert torch.equal(b.tower(values, offsets), b.tower(cut, torch.tensor([0, window, window + 3])))
    with TestClient(load_service(str(out))) as client:
        reply = client.post("/recommend", json={"history": b.item_ids[:30].tolist(), "k": 5})
    assert reply.status_code == 200 and len(reply.json()["items"]) == 5 and reply.json()["truncated"]
