"""gptlab filter (and gptlab distill's filter flags): exact and near de-duplication, length bounds, a reference
model's perplexity range, and a report whose counts add up."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import TINY_STORIES, tiny_config, write_jsonl

from gptlab.cli import main
from gptlab.config import FilterConfig
from gptlab.distill.filters import Reference, filter_corpus, parse_perplexity_range, unfiltered_path
from gptlab.errors import GptlabError

# 60 words; NEAR changes one word in the middle, so 5 of its 56 word 5-grams differ (Jaccard 51/61 = 0.84).
LONG = ("the old lighthouse keeper climbed the winding stairs every evening to light the great lamp while the gulls "
        "circled overhead and the fishing boats returned slowly across the grey water carrying their silver catch "
        "toward the small harbour where children waited on the stones and their mothers called them home for supper "
        "as the first stars appeared above the town")
NEAR = LONG.replace("fishing boats", "fishing ships")
OTHER = ("a young fox wandered through the snowy forest looking for something warm to eat and found instead a "
         "lost mitten lying beside a frozen stream which she carried back to her den where her three small cubs "
         "curled up inside it and slept through the long cold night dreaming of spring meadows full of mice and "
         "berries and sunshine and the sound of running water")


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gibberish(seed: int, chars: int = 80) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("qxzjvkwy#%&@QXZ0987{}~^") for _ in range(chars))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards):
    """A 2 x 32 run (context 32) trained for 60 steps on tiny_shards: TINY_STORIES (one of them held out as val)."""
    from gptlab.train import train

    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("filters") / "reference"
    train(tiny_config(tiny_shards, run, "--train.max_steps=60", "--train.eval_every=60", "--train.warmup_steps=4",
                      "--train.lr=1e-2"), verbose=False)
    torch.set_num_threads(threads)
    return run


def test_exact_duplicates_ignore_case_and_whitespace_and_keep_the_first(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"text": "The cat sat.", "tokens": 3, "teacher": "t"},
        {"text": "the  CAT\tsat.", "tokens": 4},
        {"text": "The dog sat.", "tokens": 3},
        {"text": " The cat sat. \n", "tokens": 3},
    ])
    s = filter_corpus(corpus, tmp_path / "out.jsonl", FilterConfig(dedup="exact"), verbose=False)
    assert read(tmp_path / "out.jsonl") == [{"text": "The cat sat.", "tokens": 3, "teacher": "t"}, {"text": "The dog sat.", "tokens": 3}]
    exact = s["filters"][0]
    assert (exact["name"], exact["removed"], exact["removed_tokens"]) == ("exact", 2, 7)
    assert [e["line"] for e in exact["examples"]] == [2, 4] and "line 1" in exact["examples"][0]["reason"]


def test_near_duplicates_go_but_distinct_texts_stay(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in (LONG, OTHER, NEAR, OTHER.upper())])
    s = filter_corpus(corpus, tmp_path / "near.jsonl", FilterConfig(dedup="near"), verbose=False)
    assert [r["text"] for r in read(tmp_path / "near.jsonl")] == [LONG, OTHER]
    exact, near = s["filters"][:2]
    assert exact["removed"] == 1 and near["removed"] == 1
    assert near["examples"][0]["line"] == 3 and "Jaccard 0.84 with line 1" in near["examples"][0]["reason"]

    # exact de-duplication alone does not see a one-word change; a stricter threshold keeps it too
    filter_corpus(corpus, tmp_path / "exact.jsonl", FilterConfig(dedup="exact"), verbose=False)
    assert [r["text"] for r in read(tmp_path / "exact.jsonl")] == [LONG, OTHER, NEAR]
    filter_corpus(corpus, tmp_path / "strict.jsonl", FilterConfig(dedup="near", near_threshold=0.9), verbose=False)
    assert [r["text"] for r in read(tmp_path / "strict.jsonl")] == [LONG, OTHER, NEAR]


def test_length_bounds_count_the_records_tokens_else_words(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"text": "a b", "tokens": 10},       # 10 tokens: kept, whatever its words
        {"text": "a b c d e f g h", "tokens": 2},  # too short by its tokens
        {"text": "one two three four"},      # no tokens: 4 words, kept
        {"text": "one two"},                 # 2 words: too short
        {"text": "x", "tokens": 30},         # too long
    ])
    s = filter_corpus(corpus, tmp_path / "out.jsonl", FilterConfig(min_tokens=4, max_tokens=20), verbose=False)
    assert [r["text"] for r in read(tmp_path / "out.jsonl")] == ["a b", "one two three four"]
    length = s["filters"][2]
    assert (length["removed"], length["removed_tokens"]) == (3, 2 + 2 + 30)
    assert [e["reason"] for e in length["examples"]] == ["2 tokens < 4", "2 tokens < 4", "30 tokens > 20"]


def test_the_reference_scores_each_text_as_eval_scores_a_stream(reference, single_thread):
    """Windows of the reference's context, every token once, whatever the batch: as gptlab eval scores a text."""
    from gptlab.evaluate.scoring import score_stream
    from gptlab.generate import start_id

    ref = Reference(reference)
    long = " ".join(TINY_STORIES[:4])  # more than the context of 32
    ids = ref.tokenizer.encode(long)
    assert len(ids) > 2 * ref.model.cfg.context_length
    by_eval = math.exp(score_stream(ref.model, ids, start_id(ref.tokenizer, ref.data), topk=()).loss)
    texts = [TINY_STORIES[0], long, gibberish(0), ""]
    one, batched = ref.perplexities(texts, batch_size=1), ref.perplexities(texts, batch_size=16)
    assert one[1] == pytest.approx(by_eval, rel=1e-5)
    assert one[:3] == pytest.approx(batched[:3], rel=1e-5)
    assert one[3] is None  # an empty text: its start token alone, nothing to predict


def test_the_perplexity_filter_keeps_stories_and_drops_gibberish(reference, tmp_path, single_thread):
    stories = [{"text": t, "prompt": t[:10], "tokens": 20, "teacher": "t"} for t in TINY_STORIES]
    noise = [{"text": gibberish(seed), "tokens": 20} for seed in range(2)]
    corpus = write_jsonl(tmp_path / "c.jsonl", [*stories[:3], noise[0], *stories[3:], noise[1]])

    scores = Reference(reference).perplexities([r["text"] for r in stories + noise])
    assert min(scores[-2:]) > 3 * max(scores[:-2])  # the reference really finds random characters unlikely

    between = math.sqrt(max(scores[:-2]) * min(scores[-2:]))
    for spec, high in (("p0:p75", None), (f":{between:.1f}", round(between, 1))):  # percentiles, then an absolute bound
        out = tmp_path / f"out{len(spec)}.jsonl"
        s = filter_corpus(corpus, out, FilterConfig(reference=str(reference), perplexity=spec), verbose=False)
        kept = read(out)
        assert [r["text"] for r in kept] == TINY_STORIES
        assert all(set(r) == {"text", "prompt", "tokens", "teacher", "perplexity"} for r in kept)
        assert [r["perplexity"] for r in kept] == pytest.approx(scores[:-2], rel=1e-3)
        perplexity = s["filters"][3]
        assert perplexity["removed"] == 2 and [e["line"] for e in perplexity["examples"]] == [4, 8]
        assert s["perplexity"]["range"] == spec
        assert s["perplexity"]["low"] == (pytest.approx(min(scores), rel=1e-5) if high is None else 0)  # p0: the lowest score
        assert high is None or s["perplexity"]["high"] == high


def test_the_report_adds_up_and_is_written_beside_the_output(reference, tmp_path, single_thread):
    records = [{"text": t, "tokens": len(t.split())} for t in TINY_STORIES]
    records += [{"text": TINY_STORIES[0].upper(), "tokens": 17}, {"text": NEAR, "tokens": 60}, {"text": LONG, "tokens": 60},
                {"text": "Hi.", "tokens": 1}, {"text": gibberish(3), "tokens": 12}]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    settings = FilterConfig(dedup="near", min_tokens=2, max_tokens=50, reference=str(reference), perplexity="p0:p90")
    s = filter_corpus(corpus, tmp_path / "clean.jsonl", settings, verbose=False)

    removed = {f["name"]: f["removed"] for f in s["filters"]}
    assert removed == {"exact": 1, "near": 1, "length": 2, "perplexity": 1}  # LONG nearly repeats NEAR, which then goes for its length
    assert s["kept"] + sum(removed.values()) == s["samples"] == len(records) == len(read(tmp_path / "clean.jsonl")) + 5
    assert s["kept_tokens"] + sum(f["removed_tokens"] for f in s["filters"]) == s["tokens"] == sum(r["tokens"] for r in records)
    assert s["kept_share"] + sum(f["share"] for f in s["filters"]) == pytest.approx(1)

    md, js = tmp_path / "clean.report.md", tmp_path / "clean.report.json"
    assert json.loads(js.read_text()) == json.loads(json.dumps(s))
    report = md.read_text()
    for title in ("exact duplicates", "near duplicates", "length", "perplexity", "**kept**"):
        assert f"| {title} |" in report
    assert "line 10 (1 tokens < 2): Hi." in report
    assert s["paragraph"].startswith(f"kept {s['kept']} of 11 samples")


def test_gptlab_filter_de_duplicates_near_by_default(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in (LONG, NEAR, OTHER)])
    out, report = tmp_path / "clean.jsonl", tmp_path / "reports" / "r.md"
    assert main(["filter", corpus, "--out", str(out), "--report", str(report), "-q"]) == 0
    assert [r["text"] for r in read(out)] == [LONG, OTHER]
    assert "kept 2 of 3 samples" in capsys.readouterr().out
    assert report.is_file() and json.loads(report.with_suffix(".json").read_text())["filters"][1]["removed"] == 1

    assert main(["filter", corpus, "--out", str(tmp_path / "all.jsonl"), "--dedup", "none", "-q"]) == 0
    assert len(read(tmp_path / "all.jsonl")) == 3


def test_gptlab_distill_filters_its_corpus_and_keeps_the_raw_one(make_export_run, tmp_path, capsys, single_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe dog\nLily and Tom\n", encoding="utf-8")
    out = tmp_path / "synthetic.jsonl"
    argv = ["distill", str(make_export_run("teacher")), "--prompts", str(prompts), "--out", str(out), "--tokens", "60",
            "--batch-size", "2", "-n", "8", "--temperature", "0", "--dedup", "near", "-q"]
    assert main(argv) == 0
    raw = read(unfiltered_path(out))
    assert unfiltered_path(out).name == "synthetic.unfiltered.jsonl" and len(raw) >= 6
    # greedy: a prompt's continuation is the same every time it comes round, so one sample per prompt is left
    assert read(out) == raw[:3]
    printed = capsys.readouterr().out
    assert f"kept 3 of {len(raw)} samples" in printed and f'path = "{out}"' in printed
    summary = json.loads((tmp_path / "synthetic.report.json").read_text())
    assert summary["filters"][0]["removed"] + summary["filters"][1]["removed"] == len(raw) - 3

    assert main(argv) == 2  # the filtered corpus is there: nothing is overwritten
    assert "already exists" in capsys.readouterr().err


def test_distill_checks_the_filters_before_the_teacher_writes(make_export_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n", encoding="utf-8")
    out = tmp_path / "s.jsonl"
    base = ["distill", str(make_export_run("teacher")), "--prompts", str(prompts), "--out", str(out), "--tokens", "8", "-q"]
    assert main([*base, "--perplexity", "p95:p5", "--reference", str(tmp_path)]) == 2
    assert main([*base, "--reference", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "LOW must be below HIGH" in err[0] and "reference run" in err[1] and "does not load" in err[1]
    assert list(tmp_path.iterdir()) == [prompts]


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "corpus not found"),
    ("", [], "holds no samples"),
    ("\n  \n", [], "holds no samples"),
    (b"\x00\x01\x02binary", [], "binary file"),
    (b"\xff\xfe{", [], "not UTF-8"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', [], "line 3 is not valid JSON"),
    ('{"text": "a"}\n\n["text"]\n', [], "line 3 is not an object with a \"text\""),
    ('{"prompt": "a"}\n', [], "line 1 is not an object"),
    ('{"text": "a"}\n', ["--reference", "MISSING"], "reference run"),
    ('{"text": "a"}\n', ["--reference", "RUNLESS"], "does not load"),
    ('{"text": "a"}\n', ["--perplexity", "5:40"], "needs a reference"),
    ('{"text": "a"}\n', ["--reference", "REF", "--perplexity", "5-40"], "is not LOW:HIGH"),
    ('{"text": "a"}\n', ["--reference", "REF", "--perplexity", "low:40"], "neither a number nor a percentile"),
    ('{"text": "a"}\n', ["--reference", "REF", "--perplexity", "40:5"], "LOW must be below HIGH"),
    ('{"text": "a"}\n', ["--reference", "REF", "--perplexity", "p5:p101"], "out of range"),
    ('{"text": "a"}\n', ["--reference", "REF", "--perplexity", ":"], "sets no bound"),
    ('{"text": "a"}\n', ["--min-tokens", "9", "--max-tokens", "3"], "above --max-tokens"),
])
def test_bad_input_is_one_line_and_exit_2(make_export_run, tmp_path, capsys, content, extra, message):
    corpus = tmp_path / "c.jsonl"
    if isinstance(content, str):
        corpus.write_text(content, encoding="utf-8")
    elif content is not None:
        corpus.write_bytes(content)
    swap = {"MISSING": str(tmp_path / "missing"), "RUNLESS": str(tmp_path), "REF": str(make_export_run("teacher"))}
    extra = [swap.get(a, a) for a in extra]
    assert main(["filter", str(corpus), "--out", str(tmp_path / "out.jsonl"), *extra, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_perplexity_ranges_parse():
    assert parse_perplexity_range("5:40") == parse_perplexity_range(" 5 : 40 ")
    low, high = parse_perplexity_range("p5:")
    assert (low.value, low.percentile, high) == (5, True, None)
    low, high = parse_perplexity_range(":p95")
    assert (low, high.value, high.percentile) == (None, 95, True)
    low, high = parse_perplexity_range("3:p90")  # mixed: checked once the percentile is known
    assert (str(low), str(high)) == ("3", "p90")
    with pytest.raises(GptlabError, match="LOW must be below HIGH"):
        parse_perplexity_range("p50:p50")
