"""Operating the service: Prometheus metrics, JSON access log, hot reload (good and refused bundles, in-flight
requests finish on their model), API key, admin routes off loopback, request deadline, 413 on an oversized body
over a real socket, and apps/serve.py end to end (SIGHUP reload, SIGTERM drain with exit 0, CLI errors)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx2")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ssd4rec_torchrec.bundle import load_serving_bundle
from ssd4rec_torchrec.serving.index import ExactIndex
from ssd4rec_torchrec.serving.recommender import Recommender, RecommendRequest
from ssd4rec_torchrec.serving.service import create_app
from ssd4rec_torchrec.serving.testing import write_fake_bundle
from tests.serving.servers import free_port, serve_in_thread

REPO = Path(__file__).resolve().parents[2]
NUM_ITEMS, DIM, MAX_HISTORY = 300, 16, 20  # as tests/serving/conftest.py's fake_bundle


def bundle_id(path: Path) -> str:
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, fake_bundle) -> dict[str, Path]:
    """``a`` (the conftest bundle), ``b`` (same sizes, other weights) and bundles that must be refused."""
    root = tmp_path_factory.mktemp("reload")
    out = {"a": fake_bundle}
    out["b"] = write_fake_bundle(root / "b", num_items=NUM_ITEMS, d=DIM, max_history=MAX_HISTORY, seed=1)
    out["d8"] = write_fake_bundle(root / "d8", num_items=NUM_ITEMS, d=8, max_history=MAX_HISTORY, seed=2)
    # a tower of width 8 in a bundle of d 16: the smoke query fails
    out["bad_tower"] = write_fake_bundle(root / "bad_tower", num_items=NUM_ITEMS, d=DIM, max_history=MAX_HISTORY,
                                         seed=3, tower_from=out["d8"])
    out["corrupt"] = root / "corrupt"
    shutil.copytree(out["b"], out["corrupt"])
    data = bytearray((out["corrupt"] / "items_fp32.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (out["corrupt"] / "items_fp32.safetensors").write_bytes(bytes(data))
    out["missing"] = root / "missing"
    shutil.copytree(out["b"], out["missing"])
    (out["missing"] / "popularity.safetensors").unlink()
    return out


def recommender_of(path: Path) -> Recommender:
    b = load_serving_bundle(path)
    b.bundle_id = bundle_id(path)
    return Recommender(b, ExactIndex(b.item_vectors))


def metrics_of(client: TestClient, **headers: str) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_and_access_log(bundles, caplog) -> None:
    rec = recommender_of(bundles["a"])
    ids = rec.raw_ids
    with TestClient(create_app(rec, max_wait_ms=1)) as c, caplog.at_level(logging.INFO,
                                                                          "ssd4rec_torchrec.serving.access"):
        assert c.post("/recommend", json={"history": ids[:3]}).status_code == 200
        assert c.post("/recommend", json={"history": ["SECRET-unknown-id"]}).json()["fallback"] == "popularity"
        assert c.post("/recommend", json={"history": ids[: MAX_HISTORY + 5]}).json()["truncated"] is True
        assert c.post("/recommend/batch", json={"requests": [{"history": ids[:2]}] * 3}).status_code == 200
        assert c.post("/recommend", json={"history": ids[:2], "k": 0}).status_code == 422
        assert c.get("/nope").status_code == 404
        m = metrics_of(c)
        lines = [r.getMessage() for r in caplog.records if r.name == "ssd4rec_torchrec.serving.access"]
    assert m[("ssd4rec_requests_total", (("route", "/recommend"), ("status", "200")))] == 3
    assert m[("ssd4rec_requests_total", (("route", "/recommend"), ("status", "422")))] == 1
    assert m[("ssd4rec_requests_total", (("route", "/recommend/batch"), ("status", "200")))] == 1
    assert m[("ssd4rec_requests_total", (("route", "other"), ("status", "404")))] == 1
    assert m[("ssd4rec_request_latency_seconds_count", (("route", "/recommend"),))] == 4
    assert m[("ssd4rec_microbatch_size_count", ())] >= 3 and m[("ssd4rec_microbatch_size_sum", ())] == 6
    assert m[("ssd4rec_queue_depth", ())] == 0
    assert m[("ssd4rec_fallbacks_total", ())] == 1 and m[("ssd4rec_truncations_total", ())] == 1
    live = [k for k in m if k[0] == "ssd4rec_bundle_info"]
    assert live == [("ssd4rec_bundle_info", (("bundle_id", bundle_id(bundles["a"])), ("path", str(bundles["a"])),
                                             ("tower", "exported")))]
    # one JSON line per request (the /metrics call included), no bodies
    assert len(lines) == 7
    records = [json.loads(line) for line in lines]
    assert [r["status"] for r in records] == [200, 200, 200, 200, 422, 404, 200]
    assert {"ts", "method", "path", "route", "status", "ms", "client", "bytes_in", "bytes_out", "bundle_id"} <= set(
        records[0])
    assert records[0]["bundle_id"] == bundle_id(bundles["a"]) and records[0]["bytes_in"] > 0
    assert not any("SECRET" in line or "history" in line for line in lines)


class GatedTower:
    """A tower that blocks in its call until ``gate`` is set (``entered`` tells that a call started)."""

    def __init__(self, tower) -> None:
        self.tower, self.gate, self.entered = tower, threading.Event(), threading.Event()

    def __call__(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.gate.wait(30)
        return self.tower(values, offsets)


def test_hot_reload_swaps_refuses_bad_bundles_and_finishes_in_flight(bundles) -> None:
    rec_a = recommender_of(bundles["a"])
    gated = GatedTower(rec_a.bundle.tower)
    rec_a.bundle.tower = gated
    rec_b = recommender_of(bundles["b"])
    ids = rec_a.raw_ids
    h1, h2 = ids[:4], ids[10:13]
    gated.gate.set()
    want_a = [rec_a.recommend([RecommendRequest(history=h)])[0] for h in (h1, h2)]
    want_b = [rec_b.recommend([RecommendRequest(history=h)])[0] for h in (h1, h2)]
    assert want_a[1]["items"] != want_b[1]["items"]
    gated.gate.clear()
    gated.entered.clear()
    with TestClient(create_app(rec_a, max_wait_ms=0)) as c:
        answers: dict[int, dict] = {}
        t1 = threading.Thread(target=lambda: answers.update({1: c.post("/recommend", json={"history": h1}).json()}))
        t1.start()
        assert gated.entered.wait(30)  # request 1 is inside A's tower call
        t2 = threading.Thread(target=lambda: answers.update({2: c.post("/recommend", json={"history": h2}).json()}))
        t2.start()
        time.sleep(0.3)  # request 2 is queued (prepared on A) behind the busy tower thread
        refused = {
            "corrupt": "does not match its manifest checksum",
            "missing": "popularity.safetensors is listed in the manifest but missing",
            "d8": "d_model 8 differs from the live bundle's 16",
            "bad_tower": "the tower returned shape (3, 8)",
            "nowhere": "no manifest.json",
        }
        for name, reason in refused.items():
            r = c.post("/admin/reload", json={"bundle": str(bundles.get(name, bundles["a"] / name))})
            assert r.status_code == 422, (name, r.text)
            assert reason in r.json()["detail"] and bundle_id(bundles["a"]) in r.json()["detail"], r.json()
        assert c.get("/metadata").json()["bundle"]["id"] == bundle_id(bundles["a"])
        assert c.post("/admin/reload", json={"bundel": "x"}).status_code == 422
        r = c.post("/admin/reload", json={"bundle": str(bundles["b"])})
        assert r.status_code == 200, r.text
        assert r.json()["bundle"]["id"] == bundle_id(bundles["b"]) and r.json()["previous"]["id"] == bundle_id(
            bundles["a"])
        gated.gate.set()
        t1.join(30)
        t2.join(30)
        for got, want in zip((answers[1], answers[2]), want_a):  # both finished on A, the model they started on
            assert [it["item_id"] for it in got["items"]] == [it["item_id"] for it in want["items"]]
        after = c.post("/recommend", json={"history": h2}).json()
        assert [it["item_id"] for it in after["items"]] == [it["item_id"] for it in want_b[1]["items"]]
        meta = c.get("/metadata").json()
        assert meta["bundle"] == {**meta["bundle"], "id": bundle_id(bundles["b"]), "path": str(bundles["b"])}
        assert c.get("/healthz").json()["bundle_id"] == bundle_id(bundles["b"])
        m = metrics_of(c)
        assert m[("ssd4rec_reloads_total", (("result", "ok"),))] == 1
        assert m[("ssd4rec_reloads_total", (("result", "refused"),))] == len(refused)
        assert [k[1][0][1] for k in m if k[0] == "ssd4rec_bundle_info"] == [bundle_id(bundles["b"])]


def test_api_key_and_admin_routes(bundles) -> None:
    rec = recommender_of(bundles["a"])
    body = {"history": rec.raw_ids[:2]}
    with TestClient(create_app(rec, api_key="s3cret-key", bind_host="0.0.0.0")) as c:
        assert c.get("/healthz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-key-and-more"},
                        {"Authorization": "Basic s3cret-key"}, {"Authorization": "s3cret-key"}):
            for method, path in (("post", "/recommend"), ("get", "/metadata"), ("get", "/metrics"),
                                 ("post", "/admin/reload")):
                r = getattr(c, method)(path, headers=headers, **({"json": body} if method == "post" else {}))
                assert r.status_code == 401 and r.json() == {"detail": "unauthorized"}, (headers, path)
                assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret-key"}
        assert c.post("/recommend", json=body, headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200
        r = c.post("/admin/reload", json={"bundle": str(bundles["corrupt"])}, headers=ok)
        assert r.status_code == 422  # admin reachable with the key (on any bind address)
    with TestClient(create_app(rec, bind_host="0.0.0.0")) as c:  # no key, not loopback: admin refused
        r = c.post("/admin/reload", json={"bundle": str(bundles["b"])})
        assert r.status_code == 403 and "--api-key-file" in r.json()["detail"]
        assert c.post("/recommend", json=body).status_code == 200
    with TestClient(create_app(rec, bind_host="127.0.0.1")) as c:  # no key, loopback: admin open
        assert c.post("/admin/reload", json={"bundle": str(bundles["corrupt"])}).status_code == 422


class SlowTower:
    """The first call sleeps ``seconds`` first (``done`` is set when it returns)."""

    def __init__(self, tower, seconds: float) -> None:
        self.tower, self.seconds, self.done = tower, seconds, threading.Event()

    def __call__(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if not self.done.is_set():
            time.sleep(self.seconds)
        try:
            return self.tower(values, offsets)
        finally:
            self.done.set()


def test_request_deadline_gives_503_with_retry_after(bundles) -> None:
    rec = recommender_of(bundles["a"])
    rec.bundle.tower = SlowTower(rec.bundle.tower, 0.6)
    with TestClient(create_app(rec, request_timeout_ms=150)) as c:
        t0 = time.perf_counter()
        r = c.post("/recommend", json={"history": rec.raw_ids[:3]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "deadline exceeded" in r.json()["detail"] and "150 ms" in r.json()["detail"]
        assert time.perf_counter() - t0 < 0.55
        assert rec.bundle.tower.done.wait(30)  # the abandoned tower call ends; its result is dropped
        for _ in range(100):  # the service answers in time again (a loaded machine may need a few tries)
            ok = c.post("/recommend", json={"history": []})
            if ok.status_code == 200:
                break
        assert ok.status_code == 200, ok.text
        m = metrics_of(c)
        assert m[("ssd4rec_deadline_exceeded_total", ())] >= 1
        assert m[("ssd4rec_requests_total", (("route", "/recommend"), ("status", "503")))] == m[
            ("ssd4rec_deadline_exceeded_total", ())]
    with pytest.raises(ValueError, match="request_timeout_ms"):
        create_app(rec, request_timeout_ms=0)


def _raw_exchange(port: int, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send a request, read until the server closes the connection (a timeout fails the test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        for chunk in body_chunks:
            s.sendall(chunk)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_oversized_body_gets_413_not_a_reset(bundles) -> None:
    app = create_app(recommender_of(bundles["a"]), max_body_bytes=16384)
    with serve_in_thread(app) as port:
        big = b"x" * (4 << 20)
        head = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(big)).encode() + b"\r\n\r\n")
        reply = _raw_exchange(port, head, [big[i:i + 65536] for i in range(0, len(big), 65536)])
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"request body over 16384 bytes" in reply
        chunked = b"POST /recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunks = [b"10000\r\n" + b"y" * 65536 + b"\r\n"] * 64 + [b"0\r\n\r\n"]
        reply = _raw_exchange(port, chunked, chunks)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_loadtest_reports_the_reload_phases(bundles, tmp_path) -> None:
    import importlib.util

    key = tmp_path / "key"
    key.write_text("load-key\n")
    app = create_app(recommender_of(bundles["a"]), api_key="load-key", max_wait_ms=5)
    with serve_in_thread(app) as port:
        spec = importlib.util.spec_from_file_location("_apps_loadtest", REPO / "apps" / "loadtest.py")
        loadtest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loadtest)
        out = tmp_path / "load.json"
        rc = loadtest.main(["--url", f"http://127.0.0.1:{port}", "--concurrency", "4", "--seconds", "3",
                            "--warmup", "0", "--bundle", str(bundles["a"]), "--reload-bundle", str(bundles["b"]),
                            "--api-key-file", str(key), "--out", str(out)])
    level = json.loads(out.read_text())["levels"][0]
    assert rc == 0 and level["errors"] == 0, level
    reload = level["reload"]
    assert reload["bundle"] == bundle_id(bundles["b"]) and set(reload["phases"]) == {"before", "during", "after"}
    assert reload["phases"]["before"]["requests"] > 0
    assert sum(p["requests"] for p in reload["phases"].values()) >= level["requests"]
    assert app.state.live.bundle_id == bundle_id(bundles["b"])


# ------------------------------------------------------------------ apps/serve.py as a process


def _http(port: int, method: str, path: str, body: dict | None = None, key: str | None = None,
          timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _text(port: int, path: str, key: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "apps" / "serve.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def test_serve_cli_errors_are_one_line(bundles, tmp_path) -> None:
    empty = tmp_path / "key"
    empty.write_text("  \n")
    cases = [
        (["--bundle", str(tmp_path)], "not a serving bundle"),
        (["--bundle", str(bundles["a"]), "--port", "0"], "--port must be in 1..65535"),
        (["--bundle", str(bundles["a"]), "--drain-seconds", "-1"], "--drain-seconds must be >= 0"),
        (["--bundle", str(bundles["a"]), "--request-timeout-ms", "0"], "--request-timeout-ms must be > 0"),
        (["--bundle", str(bundles["a"]), "--api-key-file", str(empty)], "must hold one key"),
        (["--bundle", str(bundles["a"]), "--api-key-file", str(tmp_path / "nope")], "cannot read it"),
        (["--bundle", str(bundles["a"]), "--tower", "aoti"], "no AOTInductor package"),
        (["--bundle", str(bundles["a"]), "--tower", "onnx"], "invalid choice"),
    ]
    for args, expected in cases:
        res = _serve(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and lines and lines[-1].startswith("serve: error:"), (args, res.stderr[-2000:])
        assert expected in lines[-1], (args, lines[-1])
        assert not any("Traceback" in line for line in lines), res.stderr[-2000:]


def test_serve_process_sighup_reload_and_sigterm_drain(bundles, tmp_path) -> None:
    live = tmp_path / "live"
    shutil.copytree(bundles["a"], live)
    key_file = tmp_path / "key"
    key_file.write_text("k3y-for-tests\n")
    key = "k3y-for-tests"
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "apps" / "serve.py"), "--bundle", str(live), "--port",
                             str(port), "--api-key-file", str(key_file), "--max-wait-ms", "700", "--drain-seconds",
                             "8", "--log-level", "warning"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        up = time.monotonic() + 600  # start-up imports torch and loads the bundle: slow on a loaded machine
        while time.monotonic() < up:
            try:
                if _http(port, "GET", "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                time.sleep(0.2)
        assert _http(port, "GET", "/metadata")[0] == 401
        assert _http(port, "GET", "/metadata", key=key)[1]["bundle"]["id"] == bundle_id(bundles["a"])
        # SIGHUP reloads the start path: first a broken copy (refused, A keeps serving), then bundle B
        shutil.rmtree(live)
        shutil.copytree(bundles["corrupt"], live)
        proc.send_signal(signal.SIGHUP)
        refused = time.monotonic() + 300
        while time.monotonic() < refused and 'ssd4rec_reloads_total{result="refused"} 1.0' not in _text(
                port, "/metrics", key):
            time.sleep(0.2)
        assert 'ssd4rec_reloads_total{result="refused"} 1.0' in _text(port, "/metrics", key)
        assert _http(port, "GET", "/metadata", key=key)[1]["bundle"]["id"] == bundle_id(bundles["a"])
        shutil.rmtree(live)
        shutil.copytree(bundles["b"], live)
        proc.send_signal(signal.SIGHUP)
        swapped = time.monotonic() + 300
        while time.monotonic() < swapped:
            if _http(port, "GET", "/metadata", key=key)[1]["bundle"]["id"] == bundle_id(bundles["b"]):
                break
            time.sleep(0.2)
        assert _http(port, "GET", "/metadata", key=key)[1]["bundle"]["id"] == bundle_id(bundles["b"])
        ids = _http(port, "GET", "/metadata", key=key)[1]["popular_item_ids"]
        # requests in flight (waiting 0.7 s for their micro-batch) when SIGTERM arrives are all answered
        results: list[tuple[int, dict] | Exception] = []

        def one(j: int) -> None:
            try:
                results.append(_http(port, "POST", "/recommend", {"history": ids[j:j + 3]}, key=key))
            except Exception as e:  # recorded and asserted below
                results.append(e)

        threads = [threading.Thread(target=one, args=(j,)) for j in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        stopped = time.perf_counter() - t0
        for t in threads:
            t.join(10)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err[-3000:]
    assert stopped < 8, stopped
    assert len(results) == 6 and all(not isinstance(r, Exception) and r[0] == 200 for r in results), results
    access = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert sum(1 for a in access if a["route"] == "/recommend" and a["status"] == 200) == 6
    assert "reload of" in err and "refused" in err  # the broken bundle was refused with a log line
    with pytest.raises(OSError):
        _http(port, "GET", "/healthz", timeout=2)  # stopped accepting
