"""gptlab distill: a teacher (a gptlab run, or a Hugging Face model folder) writes a JSON-lines corpus from prompts."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab.cli import main
from gptlab.config import DistillConfig, load_config
from gptlab.distill import distill_corpus, load_teacher
from gptlab.errors import GptlabError
from gptlab.generate import prompt_ids, sample_tokens
from gptlab.runs import load_run
from gptlab.text import iter_source_documents

PROMPTS = ["Once upon a time", "The dog", "Lily and Tom"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return path


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_gptlab_teacher_writes_its_samples_until_the_token_budget(make_export_run, tmp_path, single_thread):
    run = make_export_run("teacher")
    settings = DistillConfig(tokens=50, batch_size=2, max_new_tokens=8, temperature=0.9, seed=3)
    summary = distill_corpus(load_teacher(run), PROMPTS, tmp_path / "out.jsonl", settings, verbose=False)

    got = records(tmp_path / "out.jsonl")
    assert summary["records"] == len(got) and len(got) % 2 == 0  # whole batches
    assert summary["tokens"] == sum(r["tokens"] for r in got) >= 50
    assert sum(r["tokens"] for r in got[:-2]) < 50  # it stopped after the batch that reached the budget
    assert [r["prompt"] for r in got] == [PROMPTS[i % 3] for i in range(len(got))]  # prompts in turn
    assert all(r["text"].startswith(r["prompt"]) and r["teacher"] == str(run) and 0 <= r["tokens"] <= 8 for r in got)
    assert not list(tmp_path.glob("*.partial*"))

    # batch k is the teacher's own sampler with seed + k
    model, tokenizer, _ = load_run(run)
    new, _ = sample_tokens(model, [prompt_ids(tokenizer, p) for p in PROMPTS[2:] + PROMPTS[:1]], 8, temperature=0.9,
                           top_p=0.95, eos_id=tokenizer.eos_id, generator=torch.Generator().manual_seed(3 + 1))
    assert [r["text"] for r in got[2:4]] == [p + tokenizer.decode(ids) for p, ids in zip(PROMPTS[2:] + PROMPTS[:1], new)]


def test_an_interrupted_run_continues_to_the_same_file(make_export_run, tmp_path, single_thread):
    teacher = load_teacher(make_export_run("teacher"))
    settings = DistillConfig(tokens=60, batch_size=2, max_new_tokens=6)
    whole = distill_corpus(teacher, PROMPTS, tmp_path / "whole.jsonl", settings, verbose=False)

    def stop_after_two(batch):
        if batch == 2:
            raise KeyboardInterrupt

    out = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        distill_corpus(teacher, PROMPTS, out, settings, verbose=False, on_batch=stop_after_two)
    partial = tmp_path / "cut.jsonl.partial"
    assert not out.exists() and len(records(partial)) == 4
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"text": "half a li')  # a crash in the middle of a line
    with pytest.raises(GptlabError, match="another teacher, prompts or settings"):
        distill_corpus(teacher, PROMPTS, out, settings.model_copy(update={"seed": 1}), verbose=False)

    again = distill_corpus(teacher, PROMPTS, out, settings, verbose=False)
    assert again["resumed_at_record"] == 4 and again["records"] == whole["records"]
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    with pytest.raises(GptlabError, match="already exists"):
        distill_corpus(teacher, PROMPTS, out, settings, verbose=False)


def test_a_hugging_face_teacher_batches_as_it_generates_one_by_one(make_export_run, tmp_path, single_thread):
    transformers = pytest.importorskip("transformers")
    from gptlab.export.hf import export_hf

    export_hf(make_export_run("teacher"), tmp_path / "hf")
    settings = DistillConfig(tokens=30, batch_size=3, max_new_tokens=7, temperature=0)
    distill_corpus(load_teacher(tmp_path / "hf"), PROMPTS, tmp_path / "out.jsonl", settings, verbose=False)

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for record in records(tmp_path / "out.jsonl"):  # left-padded batches give what each prompt alone gives
        x = tokenizer(record["prompt"], return_tensors="pt")
        y = model.generate(**x, max_new_tokens=7, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, x["input_ids"].shape[1]:]
        y = y.tolist()[: y.tolist().index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in y.tolist() else y.tolist()
        assert record["text"] == record["prompt"] + tokenizer.decode(y, skip_special_tokens=True)
        assert record["tokens"] == len(y)

    chat = settings.model_copy(update={"chat": True})
    with pytest.raises(GptlabError, match="has no chat template"):
        distill_corpus(load_teacher(tmp_path / "hf"), PROMPTS, tmp_path / "chat.jsonl", chat, verbose=False)

    # --chat: the prompt goes through the teacher's template, and only the answer is kept
    tokenizer.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "hf")
    distill_corpus(load_teacher(tmp_path / "hf"), PROMPTS, tmp_path / "chat.jsonl", chat, verbose=False)
    for record in records(tmp_path / "chat.jsonl"):
        x = tokenizer(f"Q: {record['prompt']}\nA:", return_tensors="pt", add_special_tokens=False)
        y = model.generate(**x, max_new_tokens=7, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, x["input_ids"].shape[1]:].tolist()
        y = y[: y.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in y else y
        assert record["text"] == tokenizer.decode(y, skip_special_tokens=True)


def test_the_command_writes_a_corpus_that_reads_as_a_data_source(make_export_run, tmp_path, prompts_file, capsys, single_thread):
    out = tmp_path / "synthetic.jsonl"
    assert main(["distill", str(make_export_run("teacher")), "--prompts", str(prompts_file), "--out", str(out),
                 "--tokens", "40", "-n", "8", "--batch-size", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "samples" in printed and f'path = "{out}"' in printed
    source = load_config(None, [f"--data.sources=[{{path = {str(out)!r}}}]"]).data.sources[0]
    assert list(iter_source_documents(source)) == [r["text"].strip() for r in records(out)]  # a document a sample


@pytest.mark.parametrize("argv, message", [
    (["distill", "no/such/run", "--prompts", "{prompts}", "--out", "{out}"], "teacher not found: no/such/run"),
    (["distill", "{tmp}", "--prompts", "{prompts}", "--out", "{out}"], "is neither a gptlab run nor a Hugging Face model folder"),
    (["distill", "{tmp}", "--prompts", "no/such.txt", "--out", "{out}"], "prompt file not found: no/such.txt"),
    (["distill", "{tmp}", "--prompts", "{empty}", "--out", "{out}"], "has no prompts"),
    (["distill", "{tmp}", "--prompts", "{prompts}", "--out", "{out}", "--tokens", "0"], "distill.tokens"),
    (["distill", "{tmp}", "--prompts", "{prompts}", "--out", "{out}", "--top-p", "1.5"], "distill.top_p"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, prompts_file, capsys):
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    values = {"prompts": str(prompts_file), "out": str(tmp_path / "o.jsonl"), "tmp": str(tmp_path), "empty": str(tmp_path / "empty.txt")}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_hub_teacher_offline_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(GptlabError, match="no-such-org/no-such-model"):
        load_teacher("hf:no-such-org/no-such-model")
