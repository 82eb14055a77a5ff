"""The pages in a real browser: Debian's Chromium, headless, driven by Playwright, against the real server
(uvicorn in a thread on a free 127.0.0.1 port) over a folder of runs.

    a. the playground: pick a run, type a prompt, generate; the text streams in token by token, and hovering
       a token shows its probability and the alternatives
    b. the dashboard of a run that is training (`python -m gptlab train` in the background): its state reads
       "training", its loss curve grows between two looks, and the state turns "finished" when it ends

Skipped where /usr/bin/chromium or the playwright package is missing, unless GPTLAB_REQUIRE_BROWSER=1 (CI sets
it, so there a missing browser fails). Never a browser Playwright downloads. Screenshots go to a tmp folder,
and with GPTLAB_SCREENSHOTS=1 to docs/images/ (the README's).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import tiny_config

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("GPTLAB_REQUIRE_BROWSER") == "1"
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs the playwright package (pip install playwright; its own browsers are not used)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"GPTLAB_REQUIRE_BROWSER=1 but this machine {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM),
                                     args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def stories(n: int = 400, seed: int = 0) -> list[str]:
    """Short stories from a few templates: a corpus a tiny model learns in seconds to write readable text
    (and whose validation stories are like its training ones, unlike the tiny corpus' one unseen story)."""
    r = random.Random(seed)
    names = ["Tom", "Lily", "Ben", "Sue", "Max", "Mia", "Sam", "Anna"]
    animals = ["cat", "dog", "bird", "fish", "bunny", "frog"]
    places = ["park", "garden", "sun", "yard", "forest", "house"]
    things = ["ball", "kite", "cake", "toy car", "shell", "book", "hat"]
    adjectives = ["red", "blue", "big", "little", "shiny", "green"]
    out = []
    for _ in range(n):
        name, animal, place, thing, adj = (r.choice(x) for x in (names, animals, places, things, adjectives))
        friend = r.choice([x for x in names if x != name])
        out.append(r.choice([
            f"Once upon a time there was a {adj} {animal} named {name}. {name} liked to play in the {place}.",
            f"One day, {name} found a {adj} {thing} in the {place}. {name} was very happy and ran to show {friend}.",
            f"{name} and {friend} were friends. Every morning they played with a {adj} {thing} in the {place}.",
            f"Once upon a time, {name} had a {adj} {thing}. {name} gave the {thing} to a little {animal}. "
            f"The {animal} was happy.",
        ]))
    return out


@pytest.fixture(scope="module")
def story_data(tmp_path_factory) -> Path:
    from gptlab.config import TokenizerConfig, load_config
    from gptlab.data import prepare_data
    from gptlab.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("stories")
    docs = stories()
    (root / "stories.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in docs), encoding="utf-8")
    train_tokenizer(docs, TokenizerConfig(kind="bpe", vocab_size=512)).save(root / "tokenizer.json")
    cfg = load_config(None, [f"--data.sources=[{{path = {str(root / 'stories.txt')!r}}}]",
                             f"--data.out_dir={str(root / 'data')!r}", "--data.val_fraction=0.1", "--data.workers=1"])
    prepare_data(cfg, root / "tokenizer.json")
    return root / "data"


@pytest.fixture(scope="module")
def server(tmp_path_factory, story_data, make_export_run, chat_tokenizer):
    """The real app over a folder holding a trained run, "stories" (~10 s of training: readable text), and a
    chat run with random weights, "chat-random" (the mechanics of chat mode, not the words)."""
    import shutil

    import torch
    import uvicorn

    from gptlab.serve.app import create_app
    from gptlab.serve.registry import Registry
    from gptlab.train import train

    root = tmp_path_factory.mktemp("served")
    threads = torch.get_num_threads()
    train(tiny_config(story_data, root / "stories", "--train.max_steps=150", "--train.eval_every=50",
                      "--model.d_model=64", "--model.context_length=64", "--train.batch_size=8"), verbose=False)
    torch.set_num_threads(threads)
    from gptlab.tokenizer import load_tokenizer

    # wider and deeper than the tiny model, so that its tokens come at a pace a browser sees arrive
    shutil.copytree(make_export_run("chat-random-256", tokenizer=load_tokenizer(chat_tokenizer), context_length=256,
                                    n_layer=4, d_model=128), root / "chat-random")
    registry = Registry(root, slots=4, threads=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(registry), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    uv.should_exit = True
    thread.join(10)
    registry.close()


def screenshot(page, tmp_path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    if os.environ.get("GPTLAB_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_IMAGES / name))


def new_page(browser, height: int = 760):
    page = browser.new_page(viewport={"width": 1280, "height": height})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


def test_playground_streams_text_and_shows_each_tokens_probability(browser, server, tmp_path):
    url, _ = server
    page, errors = new_page(browser)
    page.goto(url + "/")
    page.wait_for_selector("#model option[value=stories]", state="attached")
    page.fill("#prompt", "Once upon a time")

    # streaming: chat-random (random weights, so it never ends early) writes 200 tokens; count the token
    # spans at every change of the output while it streams
    page.select_option("#model", "chat-random")
    page.eval_on_selector("#max_tokens", "e => { e.value = 200; e.dispatchEvent(new Event('input')); }")
    page.evaluate("""() => {
        const out = document.getElementById('output');
        window.seen = [];
        new MutationObserver(() => {
            if (out.dataset.state === 'streaming') window.seen.push(out.querySelectorAll('.tok').length);
        }).observe(out, {childList: true, subtree: true, attributes: true});
    }""")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]", timeout=20_000)
    seen = page.evaluate("window.seen")
    final = page.locator("#output .tok").count()
    growing = sorted({n for n in seen if 0 < n < final})
    assert final == 200 and len(growing) >= 3, f"the output did not stream: token counts seen {seen}, final {final}"
    assert "200 tokens" in page.inner_text("#status") and "max_tokens" in page.inner_text("#status")

    # Stop aborts the request (clicked at once here, so the stream cannot have ended first)
    page.evaluate("() => { document.getElementById('generate').click(); document.getElementById('stop-btn').click(); }")
    page.wait_for_selector("#output[data-state=done]")
    assert "stopped" in page.inner_text("#status") and page.is_enabled("#generate")

    # a base model: chat is off, and the page says why; its text, and each token's probability on hover
    page.select_option("#model", "stories")
    assert page.is_disabled("input[name=mode][value=chat]")
    assert "base model" in page.inner_text("#mode-note")
    page.fill("#seed", "3")
    page.eval_on_selector("#max_tokens", "e => { e.value = 60; e.dispatchEvent(new Event('input')); }")
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]", timeout=20_000)
    generated = "".join(page.locator("#output .tok").all_inner_texts())
    assert generated.strip(), "nothing generated"
    assert page.inner_text("#output").startswith("Once upon a time")

    page.hover("#output .tok >> nth=1")
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    probability = float(page.get_attribute("#output .tok >> nth=1", "data-p"))
    assert 0 < probability <= 1
    assert f"{probability * 100:.1f}%" in tip.inner_text() or f"{probability * 100:.2f}%" in tip.inner_text()
    assert tip.locator("tr").count() >= 2  # the top alternatives, with their probabilities
    assert not errors, errors
    screenshot(page, tmp_path, "serve-playground.png")


def test_chat_mode_keeps_the_conversation_until_reset(browser, server):
    url, _ = server
    page, errors = new_page(browser)
    page.goto(url + "/?model=chat-random")
    page.wait_for_selector("#model option[value=chat-random]", state="attached")
    assert page.input_value("#model") == "chat-random"  # ?model= picks the run (the dashboard links so)
    page.click("label:has(input[value=chat])")
    assert page.is_visible("#chat-mode") and not page.is_visible("#completion-mode")
    page.fill("#system", "You tell short stories.")
    page.eval_on_selector("#max_tokens", "e => { e.value = 12; e.dispatchEvent(new Event('input')); }")
    for turn, text in enumerate(["Tell me a story.", "Another one."], start=1):
        page.fill("#message", text)
        page.press("#message", "Enter")  # Enter sends
        page.wait_for_function(f"document.querySelectorAll('#chatlog .msg').length === {2 * turn}")
        page.wait_for_selector("#chatlog[data-state=done]", timeout=20_000)
        assert page.locator("#chatlog .msg.assistant").nth(turn - 1).locator(".tok").count() >= 1
    assert page.locator("#chatlog .msg.user").all_inner_texts()[1].endswith("Another one.")
    page.hover("#chatlog .msg.assistant .tok >> nth=0")
    page.locator("#tooltip").wait_for(state="visible")
    assert "%" in page.inner_text("#tooltip")
    page.click("#reset")
    assert page.locator("#chatlog .msg").count() == 0
    # a base model has no chat mode: choosing one goes back to the prompt
    page.select_option("#model", "stories")
    assert page.is_disabled("input[name=mode][value=chat]") and page.is_visible("#completion-mode")
    assert not errors, errors


def test_dashboard_follows_a_run_while_it_trains(browser, server, story_data, tmp_path):
    url, root = server
    import gptlab

    run = root / "live"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(gptlab.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    # helpers.tiny_config's model and settings, on the command line; it trains for 10 s (or 600 steps)
    command = [sys.executable, "-m", "gptlab", "train", "--quiet", "-d", str(story_data), "-r", str(run),
               "--model.n_layer=2", "--model.d_model=32", "--model.n_head=2", "--model.context_length=32",
               "--train.batch_size=4", "--train.max_steps=600", "--train.max_time=10", "--train.eval_every=40",
               "--train.eval_batches=2", "--train.log_every=1", "--train.warmup_steps=10", "--train.lr=3e-3",
               "--train.sample_every=150", "--train.sample_prompt='Once upon a time'", "--train.precision=fp32",
               "--train.compile=false", "--train.peak_flops=1e11", "--train.threads=1"]
    trainer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        while not ((run / "metrics.csv").is_file() and (run / "metrics.csv").stat().st_size > 200):
            assert trainer.poll() is None, trainer.stdout.read().decode()
            assert time.monotonic() < deadline, "the training run wrote no metrics"
            time.sleep(0.2)

        page, errors = new_page(browser, height=900)  # the picture: the run's numbers and four charts
        page.goto(url + "/runs")
        page.wait_for_selector("tr[data-run=live] [data-state=training]", timeout=10_000)
        page.click("tr[data-run=live] a")
        page.wait_for_selector("#run-view[data-state=training]", timeout=10_000)
        chart = page.locator("[data-chart=loss]")
        page.wait_for_function("document.querySelector('[data-chart=loss]').dataset.points > 0", timeout=10_000)
        before = int(chart.get_attribute("data-points"))
        page.wait_for_function(f"document.querySelector('[data-chart=loss]').dataset.points > {before}", timeout=10_000)
        after = int(chart.get_attribute("data-points"))
        assert after > before, "the curve did not grow"
        assert page.inner_text("#run-state") == "training"
        time.sleep(3)  # a few more points and a validation or two, for the picture
        screenshot(page, tmp_path, "serve-dashboard.png")

        assert trainer.wait(timeout=60) == 0, trainer.stdout.read().decode()
        page.wait_for_selector("#run-view[data-state=finished]", timeout=15_000)
        assert page.inner_text("#run-state") == "finished"
        assert int(chart.get_attribute("data-points")) >= after
        assert "[model]" in page.inner_text("#config")

        # two runs ticked on the list: their curves overlaid, one series each
        page.goto(url + "/runs")
        for name in ("live", "stories"):
            page.check(f"tr[data-run={name}] input[type=checkbox]")
        overlay = page.locator("#compare-charts [data-chart=loss]")
        overlay.wait_for()
        page.wait_for_function("document.querySelector('#compare-charts [data-chart=loss]').dataset.points >= 150")
        assert overlay.locator(".legend span").all_inner_texts() == ["live", "stories"]
        assert "#compare=live,stories" in page.url
        assert not errors, errors
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
