"""Cleaner synthetic corpora: drop a teacher's repeats, its too-short or too-long samples, and the samples a
reference model finds implausible (gibberish) or suspiciously easy (loops), and report what went.

The corpus is JSON lines, one record per sample with at least a "text" (what `gptlab distill` writes:
{text, prompt, tokens, teacher}). The filters run in a fixed order, each on what the ones before it kept,
so each counts only what it removed itself:

    1. exact duplicates   the same text once case, Unicode forms and whitespace are ignored; the first is kept
    2. near duplicates    a text whose set of word 5-grams overlaps an earlier KEPT text's with Jaccard >= the
                          threshold. MinHash LSH (datasketch) proposes candidates at a looser threshold, and the
                          exact Jaccard of the two 5-gram sets decides, so the rule is exact and only recall
                          depends on the sketch
    3. length             the record's "tokens" (the teacher's tokens in its continuation, prompt not counted);
                          a record without one counts the words of its text
    4. perplexity         the reference run's perplexity of the text, teacher-forced: the text's tokens after the
                          start token (gptlab.generate.start_id, as `gptlab eval` scores a text), a text longer
                          than the reference's context cut into consecutive windows of it, so every token is
                          scored once (in fp32); kept when LOW <= perplexity <= HIGH (inclusive). A bound is a
                          number or a percentile (pN) of the perplexities of the samples that reach this filter

Kept records keep their fields (and order); they gain "perplexity" when the reference scored them. The
output and the reports (markdown, and a JSON summary beside it) are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gptlab.config import FilterConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, atomic_write_json, atomic_write_text

SHINGLE_WORDS = 5  # near duplicates compare sets of word 5-grams
NUM_PERM = 128  # MinHash permutations: finer sketches cost time and give the exact check little to add
EXAMPLES = 3  # removed samples shown per filter in the report
EXAMPLE_CHARS = 240
FILTERS = ("exact", "near", "length", "perplexity")  # the order they run in
TITLES = {"exact": "exact duplicates", "near": "near duplicates", "length": "length", "perplexity": "perplexity"}
DEFAULT_PERPLEXITY = "p5:p95"  # with a reference and no range: trim both tails (gibberish above, loops below)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Bound:
    value: float
    percentile: bool  # value is a percentile (0-100) of the corpus's own perplexities

    def __str__(self) -> str:
        return f"p{self.value:g}" if self.percentile else f"{self.value:g}"


def parse_perplexity_range(spec: str) -> tuple[Bound | None, Bound | None]:
    """"5:40" (perplexities), "p5:p95" (percentiles), ":200" or "p10:" (one side open) -> (low, high)."""
    fix = "write --perplexity LOW:HIGH with numbers (5:40) or percentiles (p5:p95); one side may be empty (:200)"
    if spec.count(":") != 1:
        raise GptlabError(f"--perplexity {spec!r} is not LOW:HIGH", fix)
    bounds = []
    for side in spec.split(":"):
        side = side.strip()
        if not side:
            bounds.append(None)
            continue
        percentile = side[0] in "pP"
        try:
            value = float(side[1:] if percentile else side)
        except ValueError:
            raise GptlabError(f"--perplexity {spec!r}: {side!r} is neither a number nor a percentile", fix) from None
        if not math.isfinite(value) or value < 0 or (percentile and value > 100):
            raise GptlabError(f"--perplexity {spec!r}: {side!r} is out of range", "use perplexities >= 0 and percentiles p0 to p100")
        bounds.append(Bound(value, percentile))
    low, high = bounds
    if low is None and high is None:
        raise GptlabError(f"--perplexity {spec!r} sets no bound", fix)
    if low and high and low.percentile == high.percentile and low.value >= high.value:
        raise GptlabError(f"--perplexity {spec!r}: LOW must be below HIGH", fix)
    return low, high


def active(settings: FilterConfig) -> bool:
    """Whether any filter is on."""
    s = settings
    return s.dedup != "none" or s.min_tokens is not None or s.max_tokens is not None or s.reference is not None


def check_settings(settings: FilterConfig) -> tuple[Bound | None, Bound | None] | None:
    """A GptlabError now for settings that cannot work; the perplexity range when there is a reference."""
    s = settings
    if s.min_tokens is not None and s.max_tokens is not None and s.min_tokens > s.max_tokens:
        raise GptlabError(f"--min-tokens {s.min_tokens} is above --max-tokens {s.max_tokens}", "give min <= max")
    if s.perplexity is not None and s.reference is None:
        raise GptlabError("--perplexity needs a reference model to score the samples", "add --reference RUN (e.g. a run trained on the real data)")
    return parse_perplexity_range(s.perplexity or DEFAULT_PERPLEXITY) if s.reference is not None else None


def unfiltered_path(out: str | Path) -> Path:
    """Where `gptlab distill` keeps the teacher's raw corpus when it filters: data/x.jsonl -> data/x.unfiltered.jsonl."""
    out = Path(out)
    return out.with_name(f"{out.stem}.unfiltered{out.suffix or '.jsonl'}")


def report_paths(out: str | Path, settings: FilterConfig) -> tuple[Path, Path]:
    """(markdown, JSON): settings.report and the same name with .json, or OUT.report.md/.json beside the output."""
    md = Path(settings.report) if settings.report else Path(out).with_name(f"{Path(out).stem}.report.md")
    return md, md.with_suffix(".json")


# --------------------------------------------------------------------------- reading


def read_corpus(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSON-lines corpus; each record an object with a "text"."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"corpus not found: {path}", "give the JSON-lines file gptlab distill wrote")
    data = path.read_bytes()
    fix = "give a JSON-lines file: one {\"text\": ...} object per line"
    if b"\0" in data[:65536]:
        raise GptlabError(f"{path} is a binary file, not JSON lines", fix)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise GptlabError(f"{path} is not UTF-8 text", fix) from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path} line {number} is not valid JSON ({e.msg})", fix) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise GptlabError(f"{path} line {number} is not an object with a \"text\" string", fix)
        records.append((number, record))
    if not records:
        raise GptlabError(f"{path} holds no samples", "give a corpus with at least one record")
    return records


def length(record: dict) -> int:
    """The sample's tokens as the teacher counted them (its "tokens"), else the words of its text."""
    tokens = record.get("tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        return tokens
    return len(record["text"].split())


# --------------------------------------------------------------------------- de-duplication


def normalise(text: str) -> str:
    """The text as exact de-duplication compares it: NFKC, case-folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str, n: int = SHINGLE_WORDS) -> np.ndarray:
    """The text's word n-grams (words: runs of letters and digits, case-folded) as sorted unique 64-bit hashes;
    a text of fewer than n words is one shingle, an empty one none."""
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())
    grams = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()
    hashes = [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams]
    return np.unique(np.array(hashes, dtype=np.uint64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    both = len(np.intersect1d(a, b, assume_unique=True))
    return both / (len(a) + len(b) - both)


def _low32(h) -> int:
    return int(h) & 0xFFFFFFFF  # datasketch's permutations expect 32-bit hashes


class NearDuplicates:
    """Texts seen so far; `match(text)` is the earlier one the text nearly repeats (its key and Jaccard), else
    None, and remembers the text under `key` when it is new."""

    def __init__(self, threshold: float):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        # Candidates at a looser threshold than the rule: the exact Jaccard below throws out the extra ones.
        self.lsh = MinHashLSH(threshold=max(0.05, 0.75 * threshold), num_perm=NUM_PERM)
        self.kept: dict[int, np.ndarray] = {}
        self.empty = MinHash(num_perm=NUM_PERM, hashfunc=_low32)  # copied for each text: its permutations are drawn once

    def match(self, key: int, text: str) -> tuple[int, float] | None:
        grams = shingles(text)
        if not len(grams):
            return None  # nothing to compare (exact de-duplication handles repeated empty texts)
        sketch = self.empty.copy()
        sketch.update_batch(grams.tolist())
        best = None
        for other in self.lsh.query(sketch):
            similarity = jaccard(grams, self.kept[other])
            if similarity >= self.threshold and (best is None or similarity > best[1] or (similarity == best[1] and other < best[0])):
                best = (other, similarity)
        if best is None:
            self.lsh.insert(key, sketch)
            self.kept[key] = grams
        return best


# --------------------------------------------------------------------------- perplexity


class Reference:
    """A gptlab run that scores texts: per-text perplexity, teacher-forced, in windows of its context."""

    def __init__(self, run: str | Path, device: str | torch.device = "cpu"):
        from gptlab.runs import load_run

        self.name = str(run)
        try:
            self.model, self.tokenizer, cfg = load_run(run, device=device)
        except GptlabError as e:
            raise GptlabError(f"the reference run {run} does not load: {e}", "give a run gptlab train wrote (--reference RUN)") from None
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise GptlabError(f"the reference run {run} does not load ({type(e).__name__}: {' '.join(str(e).split())[:160]})",
                              "give a run gptlab train wrote (--reference RUN)") from None
        self.data = cfg.data
        self.device = next(self.model.parameters()).device

    def token_ids(self, text: str) -> list[int]:
        """The text's tokens after the start token every training document followed (as `gptlab eval` starts one)."""
        from gptlab.generate import start_id

        start = start_id(self.tokenizer, self.data)
        return ([] if start is None else [start]) + self.tokenizer.encode(text)

    @torch.no_grad()
    def perplexities(self, texts: list[str], batch_size: int = 16, progress: bool = False) -> list[float | None]:
        """exp(mean -ln p(token)) of each text's tokens (None for a text with no token to score). Windows of
        all texts share forward passes, longest first; each window is padded only to the longest in its batch."""
        from gptlab.evaluate.scoring import token_nll

        T = self.model.cfg.context_length
        windows = []  # (text index, its tokens s[k*T : k*T + T + 1]): inputs are all but the last, targets all but the first
        for i, text in enumerate(texts):
            ids = self.token_ids(text)
            windows += [(i, ids[s : s + T + 1]) for s in range(0, len(ids) - 1, T)]
        windows.sort(key=lambda w: -len(w[1]))
        nll, counts = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
        bar = tqdm(total=len(texts), unit="sample", desc="perplexity", disable=not progress, dynamic_ncols=True)
        done = np.zeros(len(texts), dtype=np.int64)
        left = np.bincount([i for i, _ in windows], minlength=len(texts))
        bar.update(int((left == 0).sum()))
        for first in range(0, len(windows), batch_size):
            batch = windows[first : first + batch_size]
            width = len(batch[0][1]) - 1
            x = torch.zeros((len(batch), width), dtype=torch.long)
            y = torch.full((len(batch), width), -1, dtype=torch.long)
            for r, (_, w) in enumerate(batch):
                x[r, : len(w) - 1] = torch.tensor(w[:-1])
                y[r, : len(w) - 1] = torch.tensor(w[1:])
            _, token_nlls = token_nll(self.model, x.to(self.device), y.to(self.device), "fp32")
            for (i, w), row in zip(batch, token_nlls.double().sum(dim=1).tolist()):
                nll[i] += row
                counts[i] += len(w) - 1
                done[i] += 1
                if done[i] == left[i]:
                    bar.update(1)
        bar.close()
        return [math.exp(min(n / c, 50.0)) if c else None for n, c in zip(nll, counts)]


def resolve_range(low: Bound | None, high: Bound | None, scores: list[float]) -> tuple[float, float]:
    """The range in perplexities: percentiles taken over `scores` (the samples reaching the filter)."""

    def value(bound: Bound | None, open_end: float) -> float:
        if bound is None:
            return open_end
        if not bound.percentile:
            return bound.value
        return float(np.percentile(scores, bound.value)) if scores else open_end

    lo, hi = value(low, 0.0), value(high, math.inf)
    if lo > hi:
        raise GptlabError(f"--perplexity {low}:{high} is {lo:.4g}:{hi:.4g} on this corpus, an empty range", "give LOW below HIGH")
    return lo, hi


# --------------------------------------------------------------------------- the filter


def filter_corpus(in_path: str | Path, out_path: str | Path, settings: FilterConfig | None = None, *,
                  reference: Reference | None = None, device: str | torch.device = "cpu", verbose: bool = True) -> dict:
    """Filter the JSON-lines corpus `in_path` into `out_path` (see the module docstring), write the markdown
    report and its JSON summary, and return the summary. `reference` is settings.reference already loaded."""
    s = settings or FilterConfig()
    in_path, out_path = Path(in_path), Path(out_path)
    bounds = check_settings(s)
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise GptlabError(f"--out {out_path} is the corpus itself", "write the filtered corpus to another file")
    records = read_corpus(in_path)
    if bounds is not None and reference is None:
        reference = Reference(s.reference, device)

    removed: dict[str, list[dict]] = {name: [] for name in FILTERS}  # per filter: {line, tokens, reason, text}
    left = records

    def drop(name: str, line: int, record: dict, reason: str, **extra) -> None:
        removed[name].append({"line": line, "tokens": length(record), "reason": reason, "text": record["text"], **extra})

    if s.dedup != "none":
        first_line, kept = {}, []
        for line, record in left:
            key = normalise(record["text"])
            if key in first_line:
                drop("exact", line, record, f"same text as line {first_line[key]}")
            else:
                first_line[key] = line
                kept.append((line, record))
        left = kept
    if s.dedup == "near":
        seen, kept = NearDuplicates(s.near_threshold), []
        for line, record in tqdm(left, unit="sample", desc="near duplicates", disable=not verbose, dynamic_ncols=True):
            match = seen.match(line, record["text"])
            if match:
                drop("near", line, record, f"Jaccard {match[1]:.2f} with line {match[0]}")
            else:
                kept.append((line, record))
        left = kept
    if s.min_tokens is not None or s.max_tokens is not None:
        low, high = s.min_tokens or 0, s.max_tokens if s.max_tokens is not None else math.inf
        kept = []
        for line, record in left:
            n = length(record)
            if n < low:
                drop("length", line, record, f"{n} tokens < {low}")
            elif n > high:
                drop("length", line, record, f"{n} tokens > {high}")
            else:
                kept.append((line, record))
        left = kept
    perplexity_info = None
    if bounds is not None:
        scores = reference.perplexities([r["text"] for _, r in left], s.batch_size, progress=verbose)
        finite = [p for p in scores if p is not None]
        lo, hi = resolve_range(*bounds, finite)
        kept = []
        for (line, record), p in zip(left, scores):
            if p is None:
                drop("perplexity", line, record, "no token to score", perplexity=None)
            elif not lo <= p <= hi:
                drop("perplexity", line, record, f"perplexity {p:.4g} {'<' if p < lo else '>'} {lo if p < lo else hi:.4g}",
                     perplexity=round(p, 4))
            else:
                kept.append((line, {**record, "perplexity": round(p, 4)}))
        left = kept
        perplexity_info = {"reference": reference.name, "range": f"{bounds[0] or ''}:{bounds[1] or ''}", "low": lo,
                           "high": hi if math.isfinite(hi) else None, "scored": len(finite),
                           "quantiles": ({f"p{q}": round(float(np.percentile(finite, q)), 4) for q in (0, 5, 25, 50, 75, 95, 100)}
                                         if finite else None)}

    with atomic_write(out_path) as f:
        f.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for _, record in left))
    summary = _summary(in_path, out_path, s, records, left, removed, perplexity_info)
    md, js = report_paths(out_path, s)
    summary["report"], summary["report_json"] = str(md), str(js)
    summary["paragraph"] = paragraph(summary)
    atomic_write_text(md, markdown_report(summary))
    atomic_write_json(js, summary)
    return summary


def _setting(name: str, s: FilterConfig, perplexity_info: dict | None) -> str | None:
    """What the filter was asked to do, in words; None when it was off."""
    if name == "exact":
        return "case and whitespace ignored" if s.dedup != "none" else None
    if name == "near":
        return f"word {SHINGLE_WORDS}-gram Jaccard >= {s.near_threshold:g}" if s.dedup == "near" else None
    if name == "length":
        if s.min_tokens is None and s.max_tokens is None:
            return None
        return f"{s.min_tokens if s.min_tokens is not None else 0} <= tokens <= {s.max_tokens if s.max_tokens is not None else 'any'}"
    if perplexity_info is None:
        return None
    hi = perplexity_info["high"]
    return (f"{perplexity_info['range']} under {perplexity_info['reference']}: "
            f"{perplexity_info['low']:.4g} <= perplexity <= {'inf' if hi is None else f'{hi:.4g}'}")


def _summary(in_path, out_path, s, records, left, removed, perplexity_info) -> dict:
    total, total_tokens = len(records), sum(length(r) for _, r in records)
    filters = []
    for name in FILTERS:
        gone = removed[name]
        n, tokens = len(gone), sum(g["tokens"] for g in gone)
        examples = [{**g, "text": g["text"] if len(g["text"]) <= EXAMPLE_CHARS else g["text"][:EXAMPLE_CHARS] + "…"}
                    for g in gone[:EXAMPLES]]
        filters.append({"name": name, "title": TITLES[name], "setting": _setting(name, s, perplexity_info),
                        "removed": n, "removed_tokens": tokens, "share": n / total, "token_share": tokens / total_tokens if total_tokens else 0.0,
                        "examples": examples})
    kept_tokens = sum(length(r) for _, r in left)
    return {"input": str(in_path), "output": str(out_path), "samples": total, "tokens": total_tokens, "kept": len(left),
            "kept_tokens": kept_tokens, "kept_share": len(left) / total, "filters": filters, "perplexity": perplexity_info,
            "order": list(FILTERS), "settings": s.model_dump()}


def paragraph(summary: dict) -> str:
    """The report in one paragraph: what was kept, what each filter that ran removed, where the report is."""
    ran = [f for f in summary["filters"] if f["setting"] is not None]
    parts = [f"{f['title']} {f['removed']:,} ({f['share']:.1%})" for f in ran]
    removed = "; removed by " + ", ".join(parts) if parts else "; no filter was on"
    return (f"kept {summary['kept']:,} of {summary['samples']:,} samples ({summary['kept_share']:.1%}) and "
            f"{summary['kept_tokens']:,} of {summary['tokens']:,} tokens in {summary['output']}{removed}; "
            f"report: {summary.get('report')}")


def markdown_report(summary: dict) -> str:
    def share(part: int, whole: int) -> str:
        return f"{part / whole:.1%}" if whole else "-"

    lines = [f"# Filter report: {summary['input']}", "", paragraph(summary) + ".", "",
             "The filters ran in this order, each on what the ones before it kept, so each row counts only what that "
             "filter removed; shares are of the whole input. Tokens are each record's \"tokens\" (the teacher's, prompt "
             "not counted), or its text's words where it has none.", "",
             "| filter | setting | samples removed | share | tokens removed | share |", "|---|---|---:|---:|---:|---:|"]
    for f in summary["filters"]:
        lines.append(f"| {f['title']} | {f['setting'] or 'off'} | {f['removed']:,} | {share(f['removed'], summary['samples'])} | "
                     f"{f['removed_tokens']:,} | {share(f['removed_tokens'], summary['tokens'])} |")
    lines.append(f"| **kept** | | {summary['kept']:,} | {share(summary['kept'], summary['samples'])} | "
                 f"{summary['kept_tokens']:,} | {share(summary['kept_tokens'], summary['tokens'])} |")
    p = summary["perplexity"]
    if p and p["quantiles"]:
        lines += ["", f"Perplexities under {p['reference']} of the {p['scored']:,} samples scored: "
                  + ", ".join(f"{q} {v:.4g}" for q, v in p["quantiles"].items()) + "."]
    for f in summary["filters"]:
        if f["examples"]:
            shown = "" if len(f["examples"]) == f["removed"] else f", the first {len(f['examples'])} shown"
            lines += ["", f"## {f['title']} ({f['removed']:,} removed{shown})", ""]
            for e in f["examples"]:
                text = " ".join(e["text"].split()).replace("|", "\\|")
                lines.append(f"- line {e['line']} ({e['reason']}): {text}")
    return "\n".join(lines) + "\n"
