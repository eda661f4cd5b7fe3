"""Config validation: every bad key/value fails at start with one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssd4rec_torchrec.config import ConfigError, TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_shorthand_and_overrides(tmp_path):
    cfg = load_train_config(None)
    assert cfg == TrainConfig()
    path = tmp_path / "c.yaml"
    path.write_text("objective: cloze\nloss: {name: sampled, num_negatives: 7}\ntrain: {epochs: 2}\n")
    cfg = load_train_config(path, ["train.epochs=5", "objective.prefixes_per_user=all", "model.flip_back=false"])
    assert cfg.objective.name == "cloze" and cfg.objective.prefixes_per_user == "all"
    assert cfg.loss.name == "sampled" and cfg.loss.num_negatives == 7
    assert cfg.train.epochs == 5 and cfg.model.flip_back is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("trian: {epochs: 1}\n", "trian: unknown key"),
        ("train: {epochs: ten}\n", "train.epochs: expected int, got 'ten'"),
        ("train: {epochs: 0}\n", "train: epochs must be >= 1, got 0"),
        ("train: {sharding: diagonal}\n", "train.sharding: expected one of 'table_wise'"),
        ("model: {dropout: 1.5}\n", "model: dropout must be in [0, 1), got 1.5"),
        ("objective: {prefixes_per_user: some}\n", "objective.prefixes_per_user: expected int | 'all', got 'some'"),
        ("loss: softmaxx\n", "loss.name: expected one of 'full' | 'sampled', got 'softmaxx'"),
        ("model: {d_model: 30, headdim: 16}\n", "model: expand*d_model=60 must be a multiple of headdim=16"),
        ("train: {metric: AUC}\n", "train: metric must look like NDCG@10"),
        ("data: {synthetic: {num_users: 1.5}}\n", "data.synthetic.num_users: expected int, got 1.5"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
        ("train: {epochs: [\n", "invalid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_train_cli_rejects_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: -1}\n")
    out = subprocess.run([sys.executable, str(REPO / "apps" / "train.py"), "--config", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"train: error: {path}: train: epochs must be >= 1, got -1"
    out = subprocess.run([sys.executable, str(REPO / "apps" / "train.py"), "--config", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "nope.yaml: no such config file" in out.stderr
    out = subprocess.run([sys.executable, str(REPO / "apps" / "train.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_train_config(path)


def test_next_objective_needs_a_causal_encoder():
    from ssd4rec_torchrec.config import ConfigError, load_train_config

    cfg = load_train_config("configs/ml1m_cloze.yaml", ["objective.name=next", "model.beta=0"])
    assert cfg.objective.name == "next" and cfg.model.beta == 0  # forward-only SSD4Rec is causal
    with pytest.raises(ConfigError, match="needs a causal encoder"):
        load_train_config("configs/ml1m_cloze.yaml", ["objective.name=next"])
    cfg = load_train_config("configs/ml1m.yaml")  # bidirectional, prefix-scope backward: causal too
    assert (cfg.objective.name, cfg.model.beta, cfg.model.backward_scope) == ("next", 0.1, "prefix")
    with pytest.raises(ConfigError, match="needs a causal encoder"):
        load_train_config("configs/ml1m.yaml", ["model.backward_scope=sequence"])
    with pytest.raises(ConfigError, match="flip_back"):
        load_train_config("configs/ml1m.yaml", ["model.flip_back=true"])


def test_float_fields_accept_scientific_notation(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; float fields take it, in a file and in --set, Optional too."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  sparse_lr: 5E-2\n  time_budget_s: 1e3\nloss:\n  temperature: 2.5e-1\n")
    cfg = load_train_config(path)
    assert (cfg.train.lr, cfg.train.sparse_lr, cfg.train.time_budget_s, cfg.loss.temperature) == (1e-4, 0.05, 1000.0,
                                                                                                   0.25)
    cfg = load_train_config(path, ["train.lr=3e-3", "train.weight_decay=-0e0", "model.dropout=1.5e-1"])
    assert (cfg.train.lr, cfg.model.dropout) == (3e-3, 0.15)
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got '1e-4x'"):
        load_train_config(path, ["train.lr=1e-4x"])


def test_resolved_config_round_trips(tmp_path):
    """The run dir's config.yaml (every field, tuples as lists) loads back to the same config."""
    import yaml

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cfg = load_train_config(tiny, ["data.synthetic.transition_probs=[0.5, 0.3, 0.2]"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again = load_train_config(path)
    assert again == cfg and again.data.synthetic.transition_probs == (0.5, 0.3, 0.2)
