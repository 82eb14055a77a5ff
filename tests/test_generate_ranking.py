"""Best-of-N ranked: candidates scored by the sampler's log-probability, a teacher's log-likelihood (a gptlab run or
a Hugging Face folder) or a user function; `gptlab sample --best-of`, `gptlab distill --best-of`, JSONL prompts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.cli import main
from gptlab.config import DistillConfig, SampleConfig
from gptlab.distill import distill_corpus, load_teacher, read_prompts
from gptlab.errors import GptlabError
from gptlab.generate import prompt_ids, sample_candidates, sample_tokens
from gptlab.generate.ranking import parse_rank_by, rank
from gptlab.runs import load_run

PROMPTS = ["Once upon a time", "The dog"]
CANDIDATES = [" there was a cat.", " Lily ran home", "!", " the end of the story and more words"]
SCORER = "def score(prompt, candidates):\n    return [len(c) for c in candidates]\n"  # the longest first


@pytest.fixture
def scorer_file(tmp_path):
    path = tmp_path / "lengths.py"
    path.write_text(SCORER + "\ndef wrong_count(prompt, candidates):\n    return [1.0]\n"
                    "\ndef not_numbers(prompt, candidates):\n    return 'abc'\n", encoding="utf-8")
    return path


def test_logprob_ranks_by_the_samplers_own_scores(make_export_run, single_thread):
    model, tokenizer, cfg = load_run(make_export_run("student"))
    sample = SampleConfig(max_new_tokens=8, temperature=1.2, seed=5, stop_at_eos=False)
    groups = sample_candidates(model, tokenizer, PROMPTS, sample, 4, data=cfg.data)

    ids = [prompt_ids(tokenizer, p, cfg.data) for p in PROMPTS for _ in range(4)]
    new, means = sample_tokens(model, ids, 8, temperature=1.2, generator=torch.Generator().manual_seed(5))
    assert [c for g in groups for c in g] == [(tokenizer.decode(t), m) for t, m in zip(new, means)]  # one batch, as drawn

    ranked = rank(parse_rank_by("logprob"), PROMPTS[0], [t for t, _ in groups[0]], [m for _, m in groups[0]])
    assert [s for _, s in ranked] == sorted(means[:4], reverse=True)
    assert {t for t, _ in ranked} == {t for t, _ in groups[0]} and len({s for _, s in ranked}) == 4


def continuation_loglik(model, tokenizer, data, prompt: str, continuation: str) -> float:
    """By hand: the mean log-probability of the continuation's tokens after the prompt, one sequence alone."""
    context, new = prompt_ids(tokenizer, prompt, data), tokenizer.encode(continuation)
    seq = torch.tensor([context + new])
    with torch.no_grad():
        logp = F.log_softmax(model(seq[:, :-1])[0].double(), dim=-1)[0]
    return sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(new)) / len(new)


def test_a_teacher_run_scores_the_continuations_mean_log_likelihood(make_export_run, single_thread):
    judge = make_export_run("judge", n_layer=1, d_model=48, n_head=4)
    scorer = parse_rank_by(f"teacher:{judge}")
    model, tokenizer, cfg = load_run(judge)
    scores = scorer.score(PROMPTS[0], CANDIDATES + [""])
    want = [continuation_loglik(model, tokenizer, cfg.data, PROMPTS[0], c) for c in CANDIDATES]
    assert scores[:-1] == pytest.approx(want, abs=1e-5) and scores[-1] == -math.inf  # an empty one ranks last
    ranked = rank(scorer, PROMPTS[0], CANDIDATES)
    assert [s for _, s in ranked] == pytest.approx(sorted(want, reverse=True), abs=1e-5)

    long = " and then" * 40  # past the teacher's 64-token context: its last part is scored
    assert math.isfinite(scorer.score("x" * 200, [long])[0])


def test_a_hugging_face_teacher_scores_as_the_run_it_was_exported_from(make_export_run, tmp_path, single_thread):
    pytest.importorskip("transformers")
    from gptlab.export.hf import export_hf

    judge = make_export_run("judge", n_layer=1, d_model=48, n_head=4)
    export_hf(judge, tmp_path / "hf")
    ours = parse_rank_by(f"teacher:{judge}").score(PROMPTS[1], CANDIDATES)
    theirs = parse_rank_by(f"teacher:{tmp_path / 'hf'}")
    assert theirs.name == f"teacher:{tmp_path / 'hf'}"
    assert theirs.score(PROMPTS[1], CANDIDATES) == pytest.approx(ours, abs=1e-4)


def test_a_python_function_ranks_by_module_or_file(tmp_path, monkeypatch, scorer_file):
    (tmp_path / "my_lengths.py").write_text(SCORER, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("python:my_lengths:score", f"python:{scorer_file}:score"):
        ranked = rank(parse_rank_by(target), "p", CANDIDATES)
        assert ranked == sorted(((c, float(len(c))) for c in CANDIDATES), key=lambda r: -r[1])

    with pytest.raises(GptlabError, match="returned 1 scores for 4 candidates"):
        parse_rank_by(f"python:{scorer_file}:wrong_count").score("p", CANDIDATES)
    with pytest.raises(GptlabError, match="not a list of numbers"):
        parse_rank_by(f"python:{scorer_file}:not_numbers").score("p", CANDIDATES)


@pytest.mark.parametrize("target, message", [
    ("teacher:", "--rank-by teacher: names no model"),
    ("teacher:no/such/run", "--rank-by teacher:no/such/run: teacher not found: no/such/run"),
    ("python:", "--rank-by python: names no function"),
    ("python:lengths", "names no function"),
    ("python:no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("python:{file}:missing", "has no function missing"),
    ("python:no/such/file.py:f", "no file no/such/file.py"),
    ("python:{broken}:f", "importing"),
    ("perplexity", "unknown --rank-by 'perplexity'"),
    ("logprob:x", "unknown --rank-by"),
])
def test_a_target_that_does_not_load_is_one_line(target, message, scorer_file, tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n", encoding="utf-8")
    with pytest.raises(GptlabError, match=".") as e:
        parse_rank_by(target.format(file=scorer_file, broken=tmp_path / "broken.py"))
    assert message in str(e.value) and "\n" not in str(e.value) and " — " in str(e.value)  # the problem and the fix


def headers(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("--- candidate")]


def test_sample_best_of_prints_the_candidates_best_first(make_export_run, scorer_file, capsys, single_thread):
    run = str(make_export_run("student"))
    base = ["sample", run, "--prompt", "Once upon", "-n", "6", "--seed", "2", "--temperature", "1.5", "--best-of", "3"]
    assert main([*base, "--rank-by", f"python:{scorer_file}:score"]) == 0
    printed = capsys.readouterr().out
    got = headers(printed)
    assert [h.split(" (")[0] for h in got] == [f"--- candidate {i} of 3 for 'Once upon'" for i in (1, 2, 3)]
    scores = [float(h.split("(score ")[1].split(",")[0]) for h in got]
    assert scores == sorted(scores, reverse=True) and all(h.endswith(f"python:{scorer_file}:score)") for h in got)
    texts = [block.split("\n", 1)[1].strip("\n") for block in printed.split("--- candidate")[1:]]
    assert [float(len(t) - len("Once upon")) for t in texts] == scores  # printed with the prompt, scored without

    assert main([*base, "--num-samples", "2"]) == 0  # logprob by default; --num-samples shows the best ones
    got = headers(capsys.readouterr().out)
    assert len(got) == 2 and got[0].startswith("--- candidate 1 of 3") and got[0].endswith(", logprob)")

    assert main([*base, "--rank-by", "teacher:"]) == 2
    err = capsys.readouterr().err
    assert "--rank-by teacher: names no model" in err and err.count("\n") == 1


def test_distill_best_of_keeps_the_best_candidate_and_resumes(make_export_run, tmp_path, scorer_file, single_thread):
    teacher = load_teacher(make_export_run("teacher"))
    scorer = parse_rank_by(f"python:{scorer_file}:score")
    settings = DistillConfig(tokens=40, batch_size=2, max_new_tokens=6, temperature=1.3, best_of=3, seed=4)
    distill_corpus(teacher, PROMPTS, tmp_path / "whole.jsonl", settings, scorer=scorer, verbose=False)
    got = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(got) >= 4 and all(r["rank_by"] == f"python:{scorer_file}:score" for r in got)

    # batch 1: its 2 prompts, 3 candidates each in one draw; the longest is kept, its own tokens counted
    drawn = teacher.continue_prompts([p for p in PROMPTS for _ in range(3)], settings, seed=4 + 1)
    for i, record in enumerate(got[2:4]):
        best = max(drawn[3 * i : 3 * i + 3], key=lambda c: len(c[0]))
        assert (record["text"], record["tokens"], record["score"]) == (PROMPTS[i] + best[0], best[1], len(best[0]))

    def stop_after_one(batch):
        if batch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        distill_corpus(teacher, PROMPTS, out, settings, scorer=scorer, verbose=False, on_batch=stop_after_one)
    with pytest.raises(GptlabError, match="another teacher, prompts or settings"):  # the scorer is part of the settings
        distill_corpus(teacher, PROMPTS, out, settings, scorer=parse_rank_by("logprob"), verbose=False)
    again = distill_corpus(teacher, PROMPTS, out, settings, scorer=scorer, verbose=False)
    assert again["resumed_at_record"] == 2 and out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_distill_best_of_by_logprob_keeps_the_teachers_likeliest(make_export_run, tmp_path, single_thread):
    run = make_export_run("teacher")
    teacher = load_teacher(run)
    settings = DistillConfig(tokens=10, batch_size=2, max_new_tokens=6, temperature=1.3, best_of=4, seed=9)
    distill_corpus(teacher, PROMPTS, tmp_path / "out.jsonl", settings, verbose=False)  # best_of alone: logprob
    first = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()][:2]
    drawn = teacher.continue_prompts([p for p in PROMPTS for _ in range(4)], settings, seed=9, logprobs=True)
    for i, record in enumerate(first):
        best = max(drawn[4 * i : 4 * i + 4], key=lambda c: c[2])
        assert (record["text"], record["score"], record["rank_by"]) == (PROMPTS[i] + best[0], best[2], "logprob")


def test_distill_command_takes_best_of_and_rank_by(make_export_run, tmp_path, capsys, single_thread):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Once upon a time"}\n"The dog"\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    judge = make_export_run("judge", n_layer=1, d_model=48, n_head=4)
    assert main(["distill", str(make_export_run("teacher")), "--prompts", str(prompts), "--out", str(out), "--tokens", "8",
                 "-n", "5", "--batch-size", "2", "--best-of", "2", "--rank-by", f"teacher:{judge}", "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records[:2]] == PROMPTS[:1] + ["The dog"]
    assert all(r["rank_by"] == f"teacher:{judge}" for r in records)
    assert main(["distill", "no/such/run", "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl"),
                 "--rank-by", "python:no_such_module_xyz:f"]) == 2
    assert "no module named 'no_such_module_xyz'" in capsys.readouterr().err


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Once upon"}\n\n{"text": " two\\nlines"}\n"plain"\n', encoding="utf-8")
    assert read_prompts(path) == ["Once upon", " two\nlines", "plain"]  # kept as written

    for content, message in [("\n \n", "prompts.jsonl has no prompts"),
                             ('"a"\n"b"\n{"prompt": "c"\n', "prompts.jsonl line 3 is not valid JSON: "),
                             ('"a"\n{"question": "b"}\n', 'prompts.jsonl line 2 has no "prompt" string'),
                             ('{"prompt": 7}\n', 'prompts.jsonl line 1 has no "prompt" string')]:
        path.write_text(content, encoding="utf-8")
        with pytest.raises(GptlabError) as e:
            read_prompts(path)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_sample_reads_a_jsonl_prompt_file(make_export_run, tmp_path, capsys, single_thread):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Once upon"}\n"The dog"\n', encoding="utf-8")
    run = str(make_export_run("student"))
    assert main(["sample", run, "--prompt-file", str(path), "-n", "4", "--best-of", "2", "--num-samples", "1"]) == 0
    got = headers(capsys.readouterr().out)
    assert [h.split(" (")[0] for h in got] == ["--- candidate 1 of 2 for 'Once upon'", "--- candidate 1 of 2 for 'The dog'"]

    path.write_text('{"prompt": "Once upon"}\n{oops\n', encoding="utf-8")
    assert main(["sample", run, "--prompt-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl line 2 is not valid JSON" in err and err.count("\n") == 1


def test_a_hugging_face_teachers_log_probabilities_match_the_run_it_was_exported_from(make_export_run, tmp_path, single_thread):
    pytest.importorskip("transformers")
    from gptlab.export.hf import export_hf

    run = make_export_run("teacher")
    export_hf(run, tmp_path / "hf")
    greedy = DistillConfig(max_new_tokens=6, temperature=0)
    ours = load_teacher(run).continue_prompts(PROMPTS, greedy, seed=0, logprobs=True)
    theirs = load_teacher(tmp_path / "hf").continue_prompts(PROMPTS, greedy, seed=0, logprobs=True)
    assert [c[:2] for c in theirs] == [c[:2] for c in ours]
    assert [c[2] for c in theirs] == pytest.approx([c[2] for c in ours], abs=1e-4)
