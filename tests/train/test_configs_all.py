"""Every shipped train config loads; ablations change only their documented fields; ``base:`` inheritance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ssd4rec_torchrec.config import ConfigError, TrainConfig, deep_merge, load_train_config, load_yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
ABLATIONS = CONFIGS / "ablations"

# ablation file -> the dotted fields (and values) it changes relative to configs/ml1m.yaml (run_dir aside)
ABLATION_CHANGES: dict[str, dict[str, Any]] = {
    "ml1m_beta0.yaml": {"model.beta": 0.0},
    "ml1m_rho01.yaml": {"objective.corruption": 0.1},
    "ml1m_rho02.yaml": {"objective.corruption": 0.2},
    "ml1m_separate_backward.yaml": {"model.share_backward_weights": False},
    "ml1m_prefix_all.yaml": {"objective.name": "prefix", "objective.prefixes_per_user": "all",
                             "model.backward_scope": "sequence"},
    # prefixes_per_user 8 is also ml1m.yaml's (default) value
    "ml1m_prefix_8.yaml": {"objective.name": "prefix", "model.backward_scope": "sequence"},
    "ml1m_sampled_softmax.yaml": {"loss.name": "sampled"},
    "ml1m_layers1.yaml": {"model.n_layers": 1},
    "ml1m_layers4.yaml": {"model.n_layers": 4},
    "ml1m_d64.yaml": {"model.d_model": 64},
    "ml1m_history_200.yaml": {"objective.max_history": 200},
}


def _train_configs() -> list[Path]:
    """YAML files under configs/ that are train configs (not report suites: no top-level ``runs:``)."""
    paths = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if "report" in path.relative_to(CONFIGS).parts[:-1]:
            continue
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "runs" in data:
            continue
        paths.append(path)
    return paths


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


@pytest.mark.parametrize("path", _train_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    assert "base" not in load_yaml(path)


def test_every_ablation_is_documented():
    assert sorted(p.name for p in ABLATIONS.glob("*.yaml")) == sorted(ABLATION_CHANGES)
    for name in ABLATION_CHANGES:
        text = (ABLATIONS / name).read_text()
        assert text.startswith("# Ablation: "), name
        assert "base: ../ml1m.yaml" in text, name


@pytest.mark.parametrize("name", sorted(ABLATION_CHANGES))
def test_ablation_changes_only_its_fields(name):
    base = _flat(load_train_config(CONFIGS / "ml1m.yaml").to_dict())
    abl = _flat(load_train_config(ABLATIONS / name).to_dict())
    assert abl["run_dir"] == f"runs/ablations/{Path(name).stem}"
    changed = {k: abl[k] for k in base if k != "run_dir" and abl[k] != base[k]}
    assert changed == ABLATION_CHANGES[name]
    if name == "ml1m_prefix_8.yaml":
        assert abl["objective.prefixes_per_user"] == 8


def test_ml1m_paper_has_the_official_settings():
    cfg = load_train_config(CONFIGS / "ml1m_paper.yaml")
    m, o, t = cfg.model, cfg.objective, cfg.train
    assert (m.name, m.d_model, m.d_state, m.headdim, m.d_conv, m.expand) == ("ssd4rec", 256, 64, 16, 4, 2)
    assert (m.n_layers, m.dropout, m.norm_embedding, m.beta, m.chunk_size) == (2, 0.2, True, 0.1, 256)
    assert m.share_backward_weights is True and m.flip_back is False and m.positional == "none"
    assert m.embedding_init_std == 0.02
    assert (o.name, o.prefixes_per_user, o.corruption, o.max_history) == ("prefix", "all", 0.1, None)
    assert cfg.loss.name == "full"
    assert (t.lr, t.weight_decay, t.sparse_optimizer, t.sparse_lr) == (1e-3, 0.0, "adam", 1e-3)
    assert t.batch_size * 2 == 1024 and t.sharding == "row_wise"  # 512 per rank x 2 ranks
    assert (t.epochs, t.patience, t.eval_every, t.metric, t.protocol) == (300, 10, 1, "NDCG@10", "unfiltered")
    assert cfg.seed == 2024 and cfg.data.dataset == "ml-1m" and (cfg.data.user_k, cfg.data.item_k) == (5, 5)


# --- base: inheritance -------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_deep_merges_nested_sections(tmp_path):
    _write(tmp_path / "base.yaml", "seed: 1\nmodel: {d_model: 32, n_layers: 3}\ndata: {dataset: synthetic, "
                                   "synthetic: {num_users: 10, num_items: 20, num_clusters: 5}}\n")
    child = _write(tmp_path / "sub" / "child.yaml",
                   "base: ../base.yaml\nmodel: {n_layers: 1}\ndata: {synthetic: {num_items: 30}}\n")
    assert load_yaml(child) == {"seed": 1, "model": {"d_model": 32, "n_layers": 1},
                                "data": {"dataset": "synthetic",
                                         "synthetic": {"num_users": 10, "num_items": 30, "num_clusters": 5}}}
    cfg = load_train_config(child, ["model.d_model=16"])
    assert (cfg.seed, cfg.model.d_model, cfg.model.n_layers) == (1, 16, 1)
    assert (cfg.data.synthetic.num_users, cfg.data.synthetic.num_items) == (10, 30)


def test_base_chain_is_recursive(tmp_path):
    _write(tmp_path / "a.yaml", "seed: 1\ntrain: {epochs: 3, lr: 0.5}\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\ntrain: {epochs: 4}\n")
    c = _write(tmp_path / "c.yaml", "base: b.yaml\nseed: 7\n")
    cfg = load_train_config(c)
    assert (cfg.seed, cfg.train.epochs, cfg.train.lr) == (7, 4, 0.5)


def test_shorthand_scalar_over_base_mapping(tmp_path):
    _write(tmp_path / "base.yaml", "loss: {name: full, temperature: 0.5}\nobjective: cloze\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\nloss: sampled\n"
                                            "objective: {mask_prob: 0.3}\n")
    cfg = load_train_config(child)
    assert cfg.loss.name == "sampled" and cfg.loss.temperature == 0.5  # scalar sets the shorthand field only
    assert cfg.objective.name == "cloze" and cfg.objective.mask_prob == 0.3  # base scalar expanded, then merged


def test_merge_rules():
    base = {"loss": {"name": "full", "temperature": 0.5}, "model": {"d_model": 8}, "data": {"dataset": "x"},
            "objective": "cloze", "tags": [1, 2]}
    over = {"loss": "sampled", "model": None, "objective": {"mask_prob": 0.1}, "tags": [3]}
    merged = deep_merge(base, over)
    assert merged == {"loss": {"name": "sampled", "temperature": 0.5}, "model": None, "data": {"dataset": "x"},
                      "objective": {"name": "cloze", "mask_prob": 0.1}, "tags": [3]}
    assert base["loss"] == {"name": "full", "temperature": 0.5}  # inputs untouched
    # with a schema, a scalar over a section without SHORTHAND replaces it (from_dict then rejects it)
    assert deep_merge({"data": {"dataset": "x"}}, {"data": "y"}, TrainConfig) == {"data": "y"}
    assert deep_merge(base, {"loss": "sampled"}, TrainConfig)["loss"] == {"name": "sampled", "temperature": 0.5}


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(a)
    msg = str(err.value)
    assert "inheritance cycle" in msg and "a.yaml" in msg and "b.yaml" in msg and "\n" not in msg
    selfref = _write(tmp_path / "self.yaml", "base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_yaml(selfref)


def test_missing_or_bad_base_names_the_file_and_key(tmp_path):
    child = _write(tmp_path / "child.yaml", "base: nope.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(child)
    assert str(err.value) == f"{child}: base: no such config file {tmp_path / 'nope.yaml'}"
    bad = _write(tmp_path / "bad.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: base: expected a path"):
        load_yaml(bad)
    _write(tmp_path / "broken.yaml", "train: {epochs: [\n")
    child2 = _write(tmp_path / "child2.yaml", "base: broken.yaml\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_yaml(child2)


def test_merged_config_errors_name_the_key(tmp_path):
    _write(tmp_path / "base.yaml", "train: {epochs: 2}\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\ntrain: {epochs: ten}\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(child)
    assert str(err.value) == f"{child}: train.epochs: expected int, got 'ten'"
