"""The HTTP service on a fake bundle: bad input never 5xx, warnings / fallback / truncation flags, micro-batching
into one packed tower call, results equal a direct tower + exact top-k, and a short load run."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx2")
from fastapi.testclient import TestClient

from ssd4rec_torchrec.bundle import load_serving_bundle
from ssd4rec_torchrec.ops.topk import block_topk
from ssd4rec_torchrec.serving.index import ExactIndex
from ssd4rec_torchrec.serving.recommender import Recommender, RecommendRequest
from ssd4rec_torchrec.serving.service import create_app, load_service
from tests.serving.servers import serve_in_thread

APPS = Path(__file__).resolve().parents[2] / "apps"


class CountingTower:
    """Wraps a tower; records the batch size of every call."""

    def __init__(self, tower) -> None:
        self.tower, self.calls = tower, []

    def __call__(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        self.calls.append(offsets.numel() - 1)
        return self.tower(values, offsets)


@pytest.fixture(scope="module")
def bundle(fake_bundle):
    b = load_serving_bundle(fake_bundle)
    b.tower = CountingTower(b.tower)
    return b


@pytest.fixture(scope="module")
def recommender(bundle) -> Recommender:
    return Recommender(bundle, ExactIndex(bundle.item_vectors))


@pytest.fixture(scope="module")
def client(recommender):
    with TestClient(create_app(recommender, max_wait_ms=1, max_body_bytes=16384)) as c:
        yield c


def ids(recommender: Recommender, *indices: int) -> list:
    return [recommender.raw_ids[i - 1] for i in indices]


def direct(bundle, history: list[int], k: int, exclude: set[int]) -> list[tuple[int, float]]:
    """Offline computation: tower on the one history, then the evaluator's exact top-k (float64 canonical)."""
    with torch.inference_mode():
        vec = bundle.tower.tower(torch.tensor(history), torch.tensor([0, len(history)]))
    hv = torch.tensor(sorted(exclude), dtype=torch.long)
    scores, cols = block_topk(vec, bundle.item_vectors, k, history_values=hv,
                              history_offsets=torch.tensor([0, len(hv)]))
    return [(int(c) + 1, float(s)) for c, s in zip(cols[0], scores[0])]


def pairs_to_items(recommender: Recommender, pairs: list[tuple[int, float]]) -> list[dict]:
    return [{"item_id": recommender.raw_ids[i - 1], "score": s} for i, s in pairs]


def assert_same_result(recommender: Recommender, got: dict, want: dict) -> None:
    """Same items in the same order and flags; scores equal up to fp32 rounding (the tower's kernels may
    round differently for different batch sizes, so a packed call is not bit-identical to a single one)."""
    assert {k: v for k, v in got.items() if k != "items"} == {k: v for k, v in want.items() if k != "items"}
    assert [it["item_id"] for it in got["items"]] == [it["item_id"] for it in want["items"]]
    np.testing.assert_allclose([it["score"] for it in got["items"]], [it["score"] for it in want["items"]],
                               rtol=1e-5, atol=1e-5)


def as_pairs(recommender: Recommender, items: list[dict]) -> list[tuple[int, float]]:
    return [(recommender.item_index(it["item_id"]), it["score"]) for it in items]


BAD = [
    ("malformed json", b'{"history": [1, 2', 400),
    ("not utf-8", b'{"history": ["\xff\xfe"]}', 400),
    ("empty body", b"", 422),
    ("body is a list", b"[1, 2]", 422),
    ("history missing", b'{"k": 5}', 422),
    ("history not a list", b'{"history": 5}', 422),
    ("history of floats", b'{"history": [1.5]}', 422),
    ("history of bools", b'{"history": [true]}', 422),
    ("history of nulls", b'{"history": [null]}', 422),
    ("nested history", b'{"history": [[1]]}', 422),
    ("object id", b'{"history": [{"id": 1}]}', 422),
    ("id string too long", json.dumps({"history": ["x" * 300]}).encode(), 422),
    ("k zero", b'{"history": [], "k": 0}', 422),
    ("k negative", b'{"history": [], "k": -3}', 422),
    ("k too big", b'{"history": [], "k": 1001}', 422),
    ("k string", b'{"history": [], "k": "10"}', 422),
    ("k float", b'{"history": [], "k": 10.5}', 422),
    ("k null", b'{"history": [], "k": null}', 422),
    ("exclude_seen string", b'{"history": [], "exclude_seen": "yes"}', 422),
    ("unknown field", b'{"history": [], "user": 7}', 422),
    ("int id over int64", b'{"history": [9223372036854775808]}', 422),
    ("huge int id", b'{"history": [' + b"9" * 5000 + b"]}", 400),  # over Python's int parsing limit
]


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_with_reason(client, name, body, status) -> None:
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, (name, r.status_code, r.text)
    assert r.json()["detail"]


def test_other_bad_requests(client) -> None:
    cases = [
        client.post("/recommend", content=b"x" * 20000, headers={"content-type": "application/json"}),  # 413
        client.post("/recommend", content=iter([b'{"history": [', b"1, " * 8000, b"1]}"])),  # chunked, 413
        client.post("/recommend", content=b'{"history": []}', headers={"content-type": "text/plain"}),
        client.post("/recommend/batch", json={"requests": [{"history": [], "k": 0}]}),
        client.post("/recommend/batch", json={"requests": [{}] * 1025}),
        client.post("/recommend/batch", json={"requests": {"history": []}}),
        client.get("/recommend"),
        client.post("/nope", json={}),
        client.post("/recommend", content=b"{}", headers={"content-type": "application/json", "content-length": "x"}),
    ]
    assert [r.status_code for r in cases] == [413, 413, 422, 422, 422, 422, 405, 404, 400]
    assert all(r.json()["detail"] for r in cases)


def test_recommend_equals_direct_tower_and_exact_topk(client, recommender, bundle) -> None:
    history = [5, 17, 3, 250, 17]
    r = client.post("/recommend", json={"history": ids(recommender, *history), "k": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["warnings"] == [] and body["fallback"] is None and body["truncated"] is False
    assert as_pairs(recommender, body["items"]) == direct(bundle, history, 7, set(history))
    r = client.post("/recommend", json={"history": ids(recommender, *history), "k": 7, "exclude_seen": False})
    assert as_pairs(recommender, r.json()["items"]) == direct(bundle, history, 7, set())


def test_brute_force_numpy_agrees(client, recommender, bundle) -> None:
    history = [9, 8, 7]
    items = client.post("/recommend", json={"history": ids(recommender, *history), "k": 10}).json()["items"]
    with torch.inference_mode():
        vec = bundle.tower.tower(torch.tensor(history), torch.tensor([0, 3])).double().numpy()[0]
    scores = bundle.item_vectors.double().numpy() @ vec
    scores[[h - 1 for h in history]] = -np.inf
    want = np.lexsort((np.arange(len(scores)), -scores))[:10] + 1
    assert [recommender.item_index(it["item_id"]) for it in items] == want.tolist()


def test_unknown_ids_warned_and_skipped(client, recommender, bundle) -> None:
    known = ids(recommender, 4, 6)
    r = client.post("/recommend", json={"history": ["nope", known[0], -1, str(known[1]), "0" + str(known[1])]})
    body = r.json()
    assert r.status_code == 200 and body["unknown_item_ids"] == ["nope", -1, "0" + str(known[1])]
    assert "3 unknown item id(s)" in body["warnings"][0] and body["fallback"] is None
    assert as_pairs(recommender, body["items"]) == direct(bundle, [4, 6], 10, {4, 6})  # "123" == 123 (int catalog)


@pytest.mark.parametrize("history", [[], ["unknown-1", 10**12]])
def test_empty_or_unknown_history_gets_popularity(client, recommender, history) -> None:
    body = client.post("/recommend", json={"history": history, "k": 5}).json()
    assert body["fallback"] == "popularity" and any("popularity" in w for w in body["warnings"])
    pop = recommender.popularity
    want = np.lexsort((np.arange(len(pop)), -pop))[:5] + 1
    assert [recommender.item_index(it["item_id"]) for it in body["items"]] == want.tolist()
    assert [it["score"] for it in body["items"]] == pop[want - 1].tolist()


def test_long_history_truncated_to_most_recent(client, recommender, bundle) -> None:
    rng = np.random.default_rng(1)
    history = rng.integers(1, bundle.num_items + 1, size=recommender.max_history + 15).tolist()
    body = client.post("/recommend", json={"history": ids(recommender, *history), "k": 10}).json()
    assert body["truncated"] is True and any("truncated" in w for w in body["warnings"])
    want = direct(bundle, history[-recommender.max_history :], 10, set(history))  # whole history excluded
    assert as_pairs(recommender, body["items"]) == want


def test_k_above_catalog_and_everything_seen(client, recommender, bundle) -> None:
    everything = ids(recommender, *range(1, bundle.num_items + 1))
    body = client.post("/recommend", json={"history": everything[:-3], "k": 1000}).json()
    assert len(body["items"]) == 3 and body["truncated"]
    assert {it["item_id"] for it in body["items"]} == set(everything[-3:])


def test_batch_endpoint_is_one_tower_call(client, recommender, bundle) -> None:
    histories = [[1, 2, 3], [], [40], [7, 7, 8, 9], ["bad"]]
    reqs = [{"history": [h if isinstance(h, str) else recommender.raw_ids[h - 1] for h in hist], "k": 4}
            for hist in histories]
    before = len(bundle.tower.calls)
    results = client.post("/recommend/batch", json={"requests": reqs}).json()["results"]
    assert bundle.tower.calls[before:] == [3]  # the three histories with known items, packed in one call
    singles = [client.post("/recommend", json=r).json() for r in reqs]
    for got, want in zip(results, singles):
        assert_same_result(recommender, got, want)
    assert client.post("/recommend/batch", json={"requests": []}).json() == {"results": []}


def test_concurrent_requests_share_one_packed_call(recommender, bundle) -> None:
    app = create_app(recommender, max_batch=64, max_wait_ms=300)
    batcher = app.state.batcher
    rng = np.random.default_rng(2)
    histories = [rng.integers(1, bundle.num_items + 1, size=rng.integers(1, 30)).tolist() for _ in range(12)]
    reqs = [RecommendRequest(history=ids(recommender, *h), k=6) for h in histories]

    async def concurrently():
        return await asyncio.gather(*(batcher.submit(recommender.prepare(r)) for r in reqs))

    before = len(bundle.tower.calls)
    results = asyncio.run(concurrently())
    assert bundle.tower.calls[before:] == [12] and batcher.batches == 1
    singles = [recommender.recommend([r])[0] for r in reqs]
    for h, res, single in zip(histories, results, singles):
        assert_same_result(recommender, res, single)
        assert_same_result(recommender, res, {**single, "items": pairs_to_items(recommender, direct(
            bundle, h[-recommender.max_history :], 6, set(h)))})


def test_max_batch_splits_calls(recommender, bundle) -> None:
    app = create_app(recommender, max_batch=5, max_wait_ms=200)
    reqs = [RecommendRequest(history=ids(recommender, i + 1), k=3) for i in range(12)]

    async def concurrently():
        return await app.state.batcher.submit_many([recommender.prepare(r) for r in reqs])

    before = len(bundle.tower.calls)
    asyncio.run(concurrently())
    assert bundle.tower.calls[before:] == [5, 5, 2]


def test_string_catalog(string_bundle) -> None:
    with TestClient(load_service(str(string_bundle), max_wait_ms=0)) as c:
        rec = c.app.state.recommender
        meta = c.get("/metadata").json()
        assert meta["item_id_type"] == "str" and meta["num_items"] == rec.bundle.num_items
        first = rec.raw_ids[0]
        body = c.post("/recommend", json={"history": [first, 12, "item-x"], "k": 3}).json()
        assert body["unknown_item_ids"] == [12, "item-x"]
        assert all(isinstance(it["item_id"], str) for it in body["items"])
        assert first not in {it["item_id"] for it in body["items"]}


def test_health_and_metadata(client, recommender) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["index"] == "exact" and meta["max_history"] == recommender.max_history
    assert meta["item_id_type"] == "int" and len(meta["popular_item_ids"]) == 100


def _load_app_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_apps_{name}", APPS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_binds_loopback_by_default() -> None:
    args = _load_app_module("serve").build_parser().parse_args(["--bundle", "b"])
    assert args.host == "127.0.0.1" and args.index == "exact"


def test_real_server_concurrency_and_loadtest(fake_bundle, tmp_path, capsys) -> None:
    """uvicorn on loopback: concurrent clients are batched; the load script runs with 0 errors."""
    pytest.importorskip("faiss")
    app = load_service(str(fake_bundle), index="hnsw", max_wait_ms=50)
    with serve_in_thread(app) as port:
        loadtest = _load_app_module("loadtest")
        out = tmp_path / "load.json"
        rc = loadtest.main(["--url", f"http://127.0.0.1:{port}", "--concurrency", "1", "4", "--seconds", "0.5",
                            "--warmup", "0", "--bundle", str(fake_bundle), "--out", str(out)])
        result = json.loads(out.read_text())
        assert rc == 0 and [lv["errors"] for lv in result["levels"]] == [0, 0]
        assert all(lv["requests"] > 0 for lv in result["levels"])
        assert result["levels"][1]["mean_batch"] > 1.0  # concurrent requests were packed together
        assert "req/s" in capsys.readouterr().out


def test_full_history_bundle_serves_whole_histories(tmp_path, fake_bundle) -> None:
    """A model trained on full histories (manifest max_history null) reads up to FULL_HISTORY_CAP items, or
    --max-history when given, and its answer is the tower's on exactly that window."""
    from ssd4rec_torchrec.serving.recommender import FULL_HISTORY_CAP
    from ssd4rec_torchrec.serving.testing import write_fake_bundle

    windowed = load_serving_bundle(fake_bundle)
    num_items, window = windowed.num_items, windowed.max_history
    root = write_fake_bundle(tmp_path / "full", num_items=num_items, d=windowed.d_model, max_history=None,
                             tower_from=fake_bundle)
    full = load_serving_bundle(root)
    assert full.max_history is None
    assert Recommender(full, ExactIndex(full.item_vectors)).max_history == FULL_HISTORY_CAP
    assert Recommender(full, ExactIndex(full.item_vectors), max_history=7).max_history == 7
    history = np.random.default_rng(3).integers(1, num_items + 1, size=window + 40).tolist()
    with TestClient(load_service(str(root), max_wait_ms=0)) as c:
        rec = c.app.state.recommender
        meta = c.get("/metadata").json()
        assert meta["bundle_max_history"] is None and meta["max_history"] == FULL_HISTORY_CAP
        body = c.post("/recommend", json={"history": ids(rec, *history), "k": 10}).json()
        assert body["truncated"] is False
        full.tower = CountingTower(full.tower)
        assert as_pairs(rec, body["items"]) == direct(full, history, 10, set(history))
