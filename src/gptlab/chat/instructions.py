"""An instruction set from stories: "Write a story about a girl named Lily that uses the words 'ball',
'garden' and 'sad'." -> the story it was made from.

For each story (TinyStories, or any file of short stories that gptlab.text reads as documents):

    name    the main character: of the names the story uses -- those in COMMON_NAMES (the frequent names of
            TinyStories) and any capitalised word introduced as "<kind> named X" -- the one it mentions most
            often (the first to appear on a tie). Its kind is the noun before "named" ("a little dog named
            Max" -> "a dog named Max") where that is one of KINDS, else the name's usual one in COMMON_NAMES
            ("a girl named Lily"), else none ("a story about Spot").
    words   three content words of the story: letters only, 3 or more of them, written in lower case
            somewhere in the story (so no names), not in STOP_WORDS and not the name; one drawn from each
            third of the story (spread over it), from the whole story where a third has none left.

A story with no name is skipped (the set is about names and words together; `skipped` counts them), and
so is one longer than `max_words`. Each record is

    {"messages": [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": STORY}],
     "constraints": {"words": [...], "name": "Lily"}, "source": "FILE#N"}

which `gptlab sft --data` trains on and gptlab.evaluate.instructions scores (every reference follows its
own instruction: the words are taken in the form the story writes them, and the checker is literal).
The choice is deterministic for a seed: the eligible stories are shuffled with it, the first `val_n` go
to the held-out set and the next `n` to the training set, so the two never share a story; the words of
story N are drawn with (seed, N), whatever else is built.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.evaluate.instructions import LETTER, follows

# The names TinyStories uses most (counted over its "... named X" phrases), with the kind of character each
# usually is; None where it is a pet's or varies.
COMMON_NAMES: dict[str, str | None] = {
    **dict.fromkeys(["Lily", "Sue", "Lucy", "Mia", "Amy", "Sally", "Jane", "Sarah", "Daisy", "Emma", "Lisa", "Bella",
                     "Anna", "Molly", "Ella", "Ann", "Mary", "Poppy", "Grace", "Ellie", "Susie", "Ruby", "Emily", "Sara",
                     "Kate", "Zoe", "Rose", "Lila", "Mimi", "Luna"], "girl"),
    **dict.fromkeys(["Tim", "Tom", "Max", "Sam", "Bob", "Timmy", "Jack", "Ben", "Billy", "Joe", "John", "Fred", "Benny",
                     "Andy", "Jerry", "Mark", "Leo", "Bobby", "Pete", "Bill", "Jim", "Freddy", "Mike", "Jake", "Ted",
                     "Tommy", "Alex", "Danny"], "boy"),
    # names that are also common words ("Blue", "Tiny", "Rose") are left out: a sentence may start with them
    **dict.fromkeys(["Spot", "Kitty", "Fluffy", "Bobo", "Fin", "Buddy", "Whiskers", "Ducky", "Momo", "Chirpy", "Remy",
                     "Ollie", "Doggy", "Coco"], None),
}
TITLES = frozenset({"Mr", "Mrs", "Ms", "Miss", "Dr", "Mister", "Uncle", "Aunt", "Grandma", "Grandpa"})
# What a character introduced as "a <kind> named X" may be called in the instruction.
KINDS = frozenset("""girl boy dog cat bird fish bunny bear frog squirrel mouse horse duck bug rabbit ant monkey bee owl
elephant turtle cow lady man woman lion pig puppy kitten fairy snake seal deer fox dragon king queen prince princess
butterfly chicken goat sheep whale shark dinosaur robot giraffe penguin wolf spider worm tiger""".split())
# Words too common in these stories, or too empty, to be worth asking for.
STOP_WORDS = frozenset("""
the and was were are for but not you your she her hers him his they them their there then than that this these those
with from into onto out off over under about above again all any because been before being both can could did does
doing down each few had has have having here how its just more most now only other our ours own same should some such
very what when where which while who whom why will would also too yet until upon once one two three day time said says
say went go goes going got get gets let lets like liked little big saw see sees seen look looked looks came come comes
make made makes know knew want wanted wants thing things way back away even ever never always still much many every
something anything nothing someone anyone everyone everything tell told asked ask yes okay felt feel feels took take
takes gave give gives put puts found find thought think lot lots after himself herself itself themselves myself yourself named name really around
""".split())
# A word: a run of letters (any script), with its contractions ("don't", "Lily’s") kept whole so they can be left out.
WORD = re.compile(rf"{LETTER}+(?:['’]{LETTER}+)*")
NAMED = re.compile(r"\b([a-z]+) named ([A-Z][a-z]+)\b")


LETTERS = re.compile(rf"{LETTER}+")


def main_character(story: str) -> tuple[str, str | None] | None:
    """(name, kind) of the story's main character (see the module docstring), or None where it names none."""
    # the last "<kind> named X" of each name
    introduced = {name: kind for kind, name in NAMED.findall(story) if name not in TITLES}
    counts = Counter(LETTERS.findall(story))  # whole words, case-sensitive: how often each name is written
    candidates = {n for n in COMMON_NAMES if counts[n]} | set(introduced)
    if not candidates:
        return None
    name = min(candidates, key=lambda n: (-counts[n], story.find(n)))
    kind = introduced.get(name)
    return name, kind if kind in KINDS else COMMON_NAMES.get(name)


def content_words(story: str, name: str, k: int = 3, rng: random.Random | None = None) -> list[str] | None:
    """k distinct content words of the story, one from each of k equal parts where possible; None if it has fewer."""
    rng = rng or random.Random(0)
    tokens = [w for w in WORD.findall(story) if "'" not in w and "’" not in w]
    lower = {w for w in tokens if w.islower()}
    ok = [w.lower() for w in tokens]
    ok = [w if (len(w) >= 3 and w in lower and w not in STOP_WORDS and w != name.lower()) else None for w in ok]
    if len({w for w in ok if w}) < k:
        return None
    chosen: list[str] = []
    for part in range(k):
        lo, hi = part * len(ok) // k, (part + 1) * len(ok) // k
        pool = sorted({w for w in ok[lo:hi] if w and w not in chosen})
        if not pool:
            pool = sorted({w for w in ok if w and w not in chosen})
        chosen.append(rng.choice(pool))
    return chosen


def instruction_text(name: str, kind: str | None, words: list[str]) -> str:
    """'Write a story about a girl named Lily that uses the words 'ball', 'garden' and 'sad'.'"""
    who = f"a {kind} named {name}" if kind else name
    quoted = [f"'{w}'" for w in words]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return f"Write a story about {who} that uses the words {listed}."


def instruction_record(story: str, seed: int, index: int, source: str = "story") -> dict | None:
    """The instruction record of one story, or None where it names no character or has too few content words."""
    character = main_character(story)
    if character is None:
        return None
    name, kind = character
    words = content_words(story, name, rng=random.Random(f"{seed}:{index}"))
    if words is None:
        return None
    record = {"messages": [{"role": "user", "content": instruction_text(name, kind, words)},
                           {"role": "assistant", "content": story}],
              "constraints": {"words": words, "name": name}, "source": f"{source}#{index}"}
    assert follows(story, record["constraints"])["ok"], record  # the reference always follows its instruction
    return record


def read_stories(path: str | Path) -> list[str]:
    """The stories of a file (or folder, or glob) as gptlab.text reads documents: <|endoftext|> lines apart."""
    from gptlab.config import SourceConfig
    from gptlab.text import iter_source_documents

    return [s for s in iter_source_documents(SourceConfig(path=str(path))) if s.strip()]


def build_instructions(stories: list[str], n: int | None = None, seed: int = 0, val_n: int = 0,
                       max_words: int | None = None, source: str = "story") -> dict:
    """{"train": [records], "val": [records], "eligible", "skipped"}: see the module docstring."""
    records = []
    for index, story in enumerate(stories):
        if max_words is not None and len(story.split()) > max_words:
            continue
        record = instruction_record(story, seed, index, source)
        if record is not None:
            records.append(record)
    random.Random(seed).shuffle(records)
    val, train = records[:val_n], records[val_n:]
    if n is not None:
        train = train[:n]
    return {"train": train, "val": val, "eligible": len(records), "skipped": len(stories) - len(records)}


def write_instruction_set(stories_path: str | Path, out: str | Path, n: int | None = None, seed: int = 0,
                          val_out: str | Path | None = None, val_n: int = 0, max_words: int | None = None) -> dict:
    """build_instructions on a stories file, written as JSON lines to `out` (and the held-out ones to `val_out`)."""
    from gptlab.files import atomic_write_text, require_file

    if val_n and val_out is None:
        raise GptlabError("held-out instructions were asked for but not where to write them", "give --val-out FILE")
    if val_out is not None and not val_n:
        raise GptlabError("--val-out was given with no held-out instructions to write", "give --val-n N as well")
    stories = read_stories(require_file(stories_path, "stories file"))
    built = build_instructions(stories, n, seed, val_n, max_words, Path(stories_path).name)
    if (n is not None and len(built["train"]) < n) or len(built["val"]) < val_n:
        raise GptlabError(f"{stories_path} has {built['eligible']:,} stories that can make an instruction, fewer than "
                          f"the {val_n + (n or 0):,} asked for", "ask for fewer (--n, --val-n), or give more stories")
    for path, records in ((out, built["train"]), (val_out, built["val"])):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"out": str(out), "val_out": str(val_out) if val_out else None, "train": len(built["train"]),
            "val": len(built["val"]), "stories": len(stories), "skipped": built["skipped"]}
