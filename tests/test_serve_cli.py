"""`gptlab serve`: its help, bad paths as one line, and a real server process answering on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gptlab import cli

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_serve_help_has_examples(capsys):
    try:
        cli.main(["serve", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "gptlab serve runs/" in out and "--api-key" in out


def test_a_bad_path_is_one_line(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["serve", str(tmp_path / "empty")]) == 2
    assert "neither a run nor a folder of runs" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), "--slots", "0"]) == 2
    assert "--slots" in capsys.readouterr().err


def test_binding_beyond_this_machine_without_a_key_warns(eval_runs, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))  # no socket is opened
    monkeypatch.delenv("GPTLAB_API_KEY", raising=False)
    assert cli.main(["serve", str(eval_runs[0]), "--host", "0.0.0.0", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert calls[0]["host"] == "0.0.0.0" and calls[0]["port"] == 8000
    assert "http://0.0.0.0:8000/runs" in out and "/v1" in out
    assert len(err.strip().splitlines()) == 1 and "warning:" in err and "--api-key" in err
    assert cli.main(["serve", str(eval_runs[0]), "--api-key", "k", "--threads", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_gptlab_serve_answers_requests(eval_runs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": SRC, "GPTLAB_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(eval_runs[0]), "--port", str(port),
                             "--threads", "1", "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                health = httpx.get(url + "/health").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert health == {"status": "ok", "models": [eval_runs[0].name], "api_key_required": True}
        r = httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 4},  # the one run: no model
                       headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == eval_runs[0].name
    finally:
        proc.terminate()
        proc.wait(10)
