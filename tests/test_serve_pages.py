"""The pages of `gptlab serve` and the dashboard's JSON routes (/api/*), through the real app with Starlette's
TestClient: runs listed with their state, metrics rows from a given row on, samples, eval results, config;
unknown and path-like run names answered 404 with an OpenAI-style body; every asset the pages load is served
by the package itself."""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gptlab.runs import write_status
from gptlab.serve import app as app_module
from gptlab.serve.app import create_app
from gptlab.serve.dashboard import metrics_since
from gptlab.serve.registry import Registry
from gptlab.train.metrics import append_sample


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, eval_runs) -> Path:
    """Two trained runs (one evaluated, one with samples) and one still training (status.json says so, written
    by this process, which is alive), with no checkpoint yet: it has only a config and some metrics rows."""
    from gptlab.config import EvalConfig
    from gptlab.evaluate.report import evaluate_run

    root = tmp_path_factory.mktemp("served")
    for run in eval_runs:
        shutil.copytree(run, root / run.name)
    evaluate_run(root / "run-1-layer", EvalConfig(threads=1, batch_size=4), progress=False)
    append_sample(root / "run-2-layer", 4, "", "Once there was a cat.")
    append_sample(root / "run-2-layer", 8, 'Tom said "hi"\n', "and ran.")
    live = root / "live"
    live.mkdir()
    shutil.copy(eval_runs[0] / "config.toml", live / "config.toml")
    lines = (eval_runs[0] / "metrics.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (live / "metrics.csv").write_text("".join(lines[:4]), encoding="utf-8")  # the header and three rows
    write_status(live, "training")
    (root / "notes.txt").write_text("not a run", encoding="utf-8")
    (root / "empty").mkdir()  # a folder without config.toml or metrics.csv: not a run
    return root


def make_client(root: Path, **settings) -> TestClient:
    registry = Registry(root, slots=2)
    if settings:
        app = create_app(registry, app_module.ServeSettings(**settings))
    else:
        app = create_app(registry)
    return TestClient(app)


@pytest.fixture(scope="module")
def client(runs_root):
    with make_client(runs_root) as c:
        yield c


def assert_not_found(response):
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"]


def test_runs_listed_with_their_state_and_latest_numbers(client, runs_root):
    body = client.get("/api/runs").json()
    assert body["root"] == str(runs_root)
    runs = {r["name"]: r for r in body["data"]}
    assert sorted(runs) == ["live", "run-1-layer", "run-2-layer"]  # not notes.txt, not the empty folder
    assert runs["live"]["state"] == "training" and runs["live"]["checkpoints"] == 0
    assert runs["live"]["step"] == 6 and runs["live"]["rows"] == 3
    for name in ("run-1-layer", "run-2-layer"):
        r = runs[name]
        assert r["state"] == "finished" and r["reason"] == "max_steps"
        assert r["step"] == 8 and r["tokens"] == 8 * 4 * 32 and r["checkpoints"] >= 1
        assert 0 < r["loss"] < 10 and 0 < r["val_loss"] < 10 and r["updated"] > 0
    assert runs["run-1-layer"]["has"] == {"samples": False, "eval": True, "config": True}
    assert runs["run-2-layer"]["has"]["samples"] is True
    assert client.get("/api/runs/run-2-layer").json() == runs["run-2-layer"]


def test_metrics_rows_since_a_row_follow_a_growing_file(client, runs_root):
    all_rows = client.get("/api/runs/run-1-layer/metrics").json()
    assert [r["step"] for r in all_rows["rows"]] == [2, 4, 6, 8] and all_rows["total"] == 4  # logged every 2 steps
    assert all_rows["columns"][:3] == ["step", "tokens", "loss"]
    assert all(isinstance(r["loss"], float) for r in all_rows["rows"])
    assert all(r["val_loss"] > 0 and r["step"] * 128 == r["tokens"] for r in all_rows["rows"])
    tail = client.get("/api/runs/run-1-layer/metrics?since=2").json()
    assert [r["step"] for r in tail["rows"]] == [6, 8] and tail["since"] == 2 and not tail["reset"]
    assert client.get("/api/runs/run-1-layer/metrics?since=4").json()["rows"] == []
    # a long history comes in pieces of at most MAX_ROWS rows
    piece = metrics_since(runs_root / "run-1-layer", since=1, limit=2)
    assert [r["step"] for r in piece["rows"]] == [4, 6] and piece["next"] == 3 and piece["total"] == 4

    # the run that trains: a new row appears for the next poll; a row still being written does not
    live = runs_root / "live" / "metrics.csv"
    first = client.get("/api/runs/live/metrics?since=0").json()
    assert first["total"] == first["next"] == 3
    row8 = (runs_root / "run-1-layer" / "metrics.csv").read_text(encoding="utf-8").splitlines()[4]
    with live.open("a", encoding="utf-8") as f:
        f.write(row8 + "\n" + row8[:10])  # a whole row, then half of the next
    more = client.get(f"/api/runs/live/metrics?since={first['next']}").json()
    assert [r["step"] for r in more["rows"]] == [8] and more["total"] == 4
    # a resumed run rewrites metrics.csv shorter: the page is told to start again
    again = client.get("/api/runs/live/metrics?since=50").json()
    assert again["reset"] and again["since"] == 0 and len(again["rows"]) == 4


def test_samples_eval_and_config(client):
    samples = client.get("/api/runs/run-2-layer/samples").json()["data"]
    assert samples == [{"step": 8, "prompt": 'Tom said "hi"\n', "text": 'Tom said "hi"\nand ran.'},
                       {"step": 4, "prompt": "", "text": "Once there was a cat."}]  # newest first
    assert client.get("/api/runs/run-1-layer/samples").json()["data"] == []

    evaluated = client.get("/api/runs/run-1-layer/eval").json()
    assert evaluated["report"]["step"] == 8 and evaluated["report"]["datasets"][0]["loss"] > 0
    assert evaluated["markdown"].startswith("#")
    assert client.get("/api/runs/run-2-layer/eval").json() == {"report": None, "markdown": None}

    config = client.get("/api/runs/live/config").json()["toml"]
    assert "[model]" in config and "n_layer = 1" in config


@pytest.mark.parametrize("path", [
    "/api/runs/nope", "/api/runs/nope/metrics", "/api/runs/empty/config", "/api/runs/notes.txt/samples",
    "/api/runs/..", "/api/runs/%2E%2E", "/api/runs/..%2Fsecret", "/api/runs/%2E%2E%2Fsecret/config",
    "/api/runs/.hidden/config", "/api/runs/-x", "/api/runs/a%00b", "/api/runs/" + "a" * 200, "/api/nothing",
    "/api/runs/link/config",
])
def test_unknown_and_path_like_names_are_404(client, runs_root, tmp_path_factory, path):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "config.toml").write_text("secret = 1\n", encoding="utf-8")
    if not (runs_root / "link").exists():
        os.symlink(outside, runs_root / "link")  # a link that leads out of the folder is not followed
    response = client.get(path)
    assert_not_found(response)
    assert "secret = 1" not in response.text
    assert client.get("/api/runs").status_code == 200  # and the server goes on


def test_serving_one_run_shows_only_that_run(runs_root):
    with TestClient(create_app(Registry(runs_root / "run-2-layer", slots=1))) as c:
        assert [r["name"] for r in c.get("/api/runs").json()["data"]] == ["run-2-layer"]
        assert c.get("/api/runs/run-2-layer/metrics").json()["total"] == 4
        assert_not_found(c.get("/api/runs/run-1-layer"))  # beside it in the folder, but not served
        assert_not_found(c.get("/api/runs/live/config"))


def test_bad_since_is_a_400(client):
    for since in ("-1", "x", "1.5", "9" * 40):
        response = client.get(f"/api/runs/run-1-layer/metrics?since={since}")
        assert response.status_code == 400, since
        assert "since" in response.json()["error"]["message"]


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value and not value.startswith("#"):
                self.urls.append(value)


@pytest.mark.parametrize("page", ["/", "/runs", "/runs/run-1-layer", "/runs/not-there"])
def test_pages_and_every_asset_they_load_are_served_by_the_package(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    parser = _Assets()
    parser.feed(response.text)
    assets = [u for u in parser.urls if u.startswith("/static/")]
    assert any(u.endswith(".js") for u in assets) and any(u.endswith(".css") for u in assets)
    for url in parser.urls:
        assert url.startswith("/"), f"{page} loads {url} from elsewhere: the pages must work offline"
        assert client.get(url).status_code == 200, url
    for url in assets:
        text = client.get(url).text
        assert text.strip()
        # nothing fetched from another site (an SVG's xmlns is a name, not a download)
        assert "https://" not in text and "//cdn" not in text, url
        assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', ""), url
    assert client.get("/static/nothing.js").status_code == 404


def test_with_an_api_key_the_json_routes_need_it_and_the_pages_do_not(runs_root):
    if not hasattr(app_module, "ServeSettings"):
        pytest.skip("this checkout's create_app takes no settings yet (the API key is serve/app.py's)")
    with make_client(runs_root, api_key="sesame") as c:
        assert c.get("/api/runs").status_code == 401
        assert c.get("/api/runs/run-1-layer/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer sesame"}).json()["data"]
        assert c.get("/").status_code == 200 and c.get("/runs/live").status_code == 200
        assert c.get("/static/playground.js").status_code == 200
        assert c.get("/health").json()["api_key_required"] is True
