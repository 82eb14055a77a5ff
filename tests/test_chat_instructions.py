"""The instruction checker (`follows`) and the instruction set built from stories (gptlab.chat.instructions,
`gptlab data instructions`)."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_STORIES

from gptlab.chat.instructions import (
    build_instructions,
    content_words,
    instruction_text,
    main_character,
    read_stories,
)
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.evaluate.instructions import follows, read_instructions

STORY = ("One day, a little girl named Lily went to the garden with her red ball. The Ball rolled away and "
         "Lily felt sad. Her friend Tom found it under a tree. \"Thank you, Tom!\" said Lily. Lily's ball was safe.")
MORE_STORIES = [
    STORY,
    "Once upon a time, a little dog named Max lived near a farm. Max liked to dig holes and find bones. "
    "One morning he dug up a shiny key. The farmer laughed and gave Max a big bone.",
    "The sun was hot. A bird sat on a branch and sang a song about the sea.",  # no name: skipped
    "Sue and Tim built a tall tower of blocks. Tim was careful, but the tower fell. Sue laughed and Tim laughed "
    "too, and they built it again, taller than before. Tim clapped.",
    "Spot was a happy puppy. Spot ran in the grass and chased a yellow butterfly until it flew over the fence.",
] + TINY_STORIES


def test_follows_words_as_whole_words_in_any_case():
    result = follows(STORY, {"words": ["ball", "garden", "sad"], "name": "Lily"})
    assert result == {"ok": True, "words": True, "words_used": 3, "words_asked": 3, "name": True, "missing": []}
    assert follows("The BALL, the Garden... so SAD!", {"words": ["ball", "garden", "sad"]})["ok"]  # case, punctuation
    assert follows("Lily’s ball and Tom's kite.", {"words": ["ball", "kite"], "name": "Lily"})["ok"]  # possessives
    assert follows("an ice-cream", {"words": ["ice", "cream"]})["ok"]


def test_follows_is_strict_about_inflections_and_absent_words():
    """The instruction names a form: "balls", "football", "saddest" are other words (no stemming, by design)."""
    result = follows("Two balls in the football field; the saddest day.", {"words": ["ball", "sad", "field"]})
    assert result["ok"] is False and result["missing"] == ["ball", "sad"] and result["words_used"] == 1
    assert follows("She gardens.", {"words": ["garden"]})["missing"] == ["garden"]
    named = follows("Lilyanne and lily played.", {"name": "Lily"})
    assert named["name"] is True  # "lily" is the name as a whole word, whatever its case
    absent = follows("Tom played with the ball.", {"words": ["ball"], "name": "Lily"})
    assert absent["ok"] is False and absent["name"] is False and absent["words"] is True and absent["missing"] == ["Lily"]


def test_follows_rejects_constraints_it_cannot_check():
    for bad, message in [({}, "no constraints"), ({"words": "ball"}, "not a list of words"),
                         ({"words": ["ball", ""]}, "not a list of words"), ({"name": 3}, "not a name"),
                         ({"colour": "red"}, "unknown constraint 'colour'")]:
        with pytest.raises(GptlabError, match=message):
            follows("text", bad)


def test_main_character_and_kind():
    assert main_character(STORY) == ("Lily", "girl")  # mentioned most; "a little girl named"
    assert main_character(MORE_STORIES[1]) == ("Max", "dog")  # the noun before "named"
    assert main_character(MORE_STORIES[3]) == ("Tim", "boy")  # the most frequent of two known names; its usual kind
    assert main_character(MORE_STORIES[4]) == ("Spot", None)  # a known name of no set kind
    assert main_character(MORE_STORIES[2]) is None
    assert main_character("A cat named Zed met a man named Mr Bell. Zed purred.") == ("Zed", "cat")  # any "named X"
    assert instruction_text("Spot", None, ["grass"]) == "Write a story about Spot that uses the words 'grass'."
    assert (instruction_text("Lily", "girl", ["ball", "garden", "sad"])
            == "Write a story about a girl named Lily that uses the words 'ball', 'garden' and 'sad'.")


def test_content_words_come_from_the_story_spread_over_it():
    import random

    words = content_words(STORY, "Lily", rng=random.Random(0))
    assert len(set(words)) == 3 and "lily" not in words and "tom" not in words  # never a name
    thirds = [STORY.split()[i * len(STORY.split()) // 3 : (i + 1) * len(STORY.split()) // 3] for i in range(3)]
    for word, third in zip(words, thirds):  # one from each third
        assert word in " ".join(third).lower()
    assert all(len(w) >= 3 and w not in {"the", "with", "said"} for w in words)
    assert content_words("Tom ran. Tom sat.", "Tom") is None  # too few content words


def test_build_is_deterministic_and_every_reference_follows_its_instruction():
    one = build_instructions(MORE_STORIES, n=4, seed=3, val_n=2)
    assert one == build_instructions(MORE_STORIES, n=4, seed=3, val_n=2)
    assert one != build_instructions(MORE_STORIES, n=4, seed=4, val_n=2)
    assert len(one["train"]) == 4 and len(one["val"]) == 2 and one["skipped"] >= 1
    val_sources = {r["source"] for r in one["val"]}
    assert not val_sources & {r["source"] for r in one["train"]}  # never the same story in both
    for record in one["train"] + one["val"]:
        user, assistant = record["messages"]
        c = record["constraints"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert f"named {c['name']}" in user["content"] or f"about {c['name']} " in user["content"]
        assert all(f"'{w}'" in user["content"] for w in c["words"])
        assert follows(assistant["content"], c)["ok"]
    # the held-out set is the same whatever the size of the training set
    assert build_instructions(MORE_STORIES, n=1, seed=3, val_n=2)["val"] == one["val"]


def test_cli_writes_the_sets_that_eval_reads(tmp_path, capsys):
    stories = tmp_path / "stories.txt"
    stories.write_text("".join(f"{s}\n<|endoftext|>\n" for s in MORE_STORIES), encoding="utf-8")
    out, val = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    args = ["data", "instructions", "--stories", str(stories), "--out", str(out), "--val-out", str(val), "--val-n", "3",
            "--seed", "7"]
    assert main(args) == 0
    assert "held out" in capsys.readouterr().out
    first = out.read_bytes()
    train = [json.loads(line) for line in first.decode().splitlines()]
    named = [s for s in read_stories(stories) if main_character(s)]
    assert len(train) + 3 == len(named) == len(MORE_STORIES) - 3  # every story but the three that name no one
    assert main(args) == 0 and out.read_bytes() == first  # deterministic
    records = read_instructions(str(val))
    assert len(records) == 3 and all(follows(c.messages[-1]["content"], c.extra["constraints"])["ok"] for c in records)
    bad = [(["--stories", str(tmp_path / "none.txt"), "--out", str(out)], "stories file not found"),
           (["--stories", str(stories), "--out", str(out), "--n", "100"], "fewer than the 100 asked for"),
           (["--stories", str(stories), "--out", str(out), "--val-n", "2"], "give --val-out FILE"),
           (["--stories", str(stories), "--out", str(out), "--n", "0"], "--n 0 is not a count")]
    for flags, message in bad:
        capsys.readouterr()
        assert main(["data", "instructions", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)


def test_on_real_tinystories(shared_data):
    """A held-out set from the V2 stories that a base model's recipe never trains on: every reference follows."""
    stories = read_stories(shared_data / "tinystories" / "TinyStoriesV2-GPT4-valid_head5M.txt")
    built = build_instructions(stories, n=50, seed=0, val_n=200, max_words=250)
    assert len(built["val"]) == 200 and built["eligible"] > 0.5 * len(stories)
    assert all(follows(r["messages"][1]["content"], r["constraints"])["ok"] for r in built["train"] + built["val"])
    names = {r["constraints"]["name"] for r in built["val"]}
    assert {"Lily", "Tim", "Tom"} <= names and all(len(r["messages"][1]["content"].split()) <= 250 for r in built["val"])


@pytest.mark.slow
def test_the_demonstration_runs_end_to_end_at_toy_scale(shared_data, tmp_path):
    """benchmarks/chat_tinystories.py --quick: base, instruction sets, gptlab sft, comparison (about 1-2 minutes)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPTLAB_SHARED_DATA": str(shared_data), "PYTHONPATH": str(repo / "src")}
    if subprocess.run([sys.executable, "-m", "gptlab", "sft", "--help"], capture_output=True, env=env).returncode:
        pytest.skip("gptlab sft is not in this checkout")
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "chat_tinystories.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = done.stdout.strip().splitlines()[-1]
    assert result.startswith("RESULT base_follow_rate=") and " sft_heldout_loss=" in result and " cpu=" in result
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["reference_rate"] == 1.0 and results["instructions"] == 20
    assert results["rows"]["base"]["follow"]["format"] == "text" and results["rows"]["sft"]["follow"]["format"] == "chat"
    assert results["rows"]["base"]["loss"]["bytes"] == results["rows"]["sft"]["loss"]["bytes"]  # the same story text
