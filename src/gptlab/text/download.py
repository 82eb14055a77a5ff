"""Known datasets and `download_dataset`: what `gptlab data download NAME` fetches.

A file on the web is streamed to a temporary file beside the target and renamed
when complete; a Hugging Face dataset is streamed with `datasets` and written as
JSON lines ({"text": ...}). Either way the result is a local file to use as a
source path. Without a network the download fails in seconds with one line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from gptlab.config import SourceConfig
from gptlab.errors import GptlabError
from gptlab.files import atomic_write

TIMEOUT = 10  # seconds without an answer before a download gives up
CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownDataset:
    name: str
    description: str
    filename: str  # written under the output folder
    size: str  # of the full dataset, for the table
    url: str | None = None  # a file fetched as it is ...
    hf: str | None = None  # ... or a Hugging Face dataset, streamed and written as JSON lines
    hf_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_bytes: int | None = None  # big corpora stop here unless the caller says otherwise
    use: str = ""  # how to point a source at the result

    @property
    def source(self) -> str:
        return self.url or f"hf:{self.hf}" + (f" ({self.hf_config}, {self.split})" if self.hf_config else f" ({self.split})")


GB = 1_000_000_000
HF_RESOLVE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
KNOWN_DATASETS: dict[str, KnownDataset] = {
    d.name: d
    for d in [
        KnownDataset("tinystories", "TinyStories V1 training text (Eldan & Li 2023), <|endoftext|> between stories",
                     "TinyStories-train.txt", "1.9 GB", url=f"{HF_RESOLVE}/TinyStories-train.txt",
                     use='documents = "separator"'),
        KnownDataset("tinystories-valid", "TinyStories V1 validation text", "TinyStories-valid.txt", "19 MB",
                     url=f"{HF_RESOLVE}/TinyStories-valid.txt", use='documents = "separator" (as val_sources)'),
        KnownDataset("tinystories-hf", "TinyStories via the datasets library (roneneldan/TinyStories)",
                     "tinystories_train.jsonl", "1.9 GB", hf="roneneldan/TinyStories", use='documents = "record"'),
        KnownDataset("fineweb-edu", "FineWeb-Edu sample-10BT, educational web text (streamed; stops at max_bytes)",
                     "fineweb_edu_sample10BT.jsonl", "~45 GB", hf="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT",
                     max_bytes=GB, use='documents = "record"'),
        KnownDataset("wikipedia-en", "English Wikipedia, 2023-11-01 dump (streamed; stops at max_bytes)",
                     "wikipedia_en_20231101.jsonl", "~20 GB", hf="wikimedia/wikipedia", hf_config="20231101.en",
                     max_bytes=GB, use='documents = "record"'),
        KnownDataset("meditations", "Marcus Aurelius, Meditations (Project Gutenberg #2680, Casaubon translation)",
                     "meditations.txt", "0.4 MB", url="https://www.gutenberg.org/cache/epub/2680/pg2680.txt",
                     use='documents = "blank_lines"; text.normalize = ["strip_gutenberg", "greek_to_latin", "whitespace"]'),
        KnownDataset("tinyshakespeare", "Tiny Shakespeare (karpathy/char-rnn input.txt)", "tinyshakespeare.txt", "1.1 MB",
                     url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                     use='documents = "blank_lines" (or "file"); tokenizer.kind = "char"'),
        KnownDataset("hellaswag-val", "HellaSwag validation set (rowanz/hellaswag), for evaluation",
                     "hellaswag_val.jsonl", "11 MB",
                     url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                     use="an evaluation set, not a training corpus"),
    ]
}  # fmt: skip


def list_datasets() -> list[dict]:
    """One row per known dataset: name, description, size, source, filename, use (for `--list`)."""
    return [{**asdict(d), "source": d.source} for d in KNOWN_DATASETS.values()]


def download_dataset(name: str, out_dir: str | Path, max_bytes: int | None = None, force: bool = False) -> Path:
    """Fetch a known dataset into `out_dir` and return the file's path (kept as is if already there).

    `max_bytes` stops early (at a line end for files, a record for datasets); the
    streamed datasets (fineweb-edu, wikipedia-en) default to 1 GB.
    """
    if name not in KNOWN_DATASETS:
        raise GptlabError(f"unknown dataset {name!r}", f"choose one of: {', '.join(KNOWN_DATASETS)}")
    spec = KNOWN_DATASETS[name]
    out = Path(out_dir) / spec.filename
    if out.is_file() and not force:
        return out
    limit = max_bytes or spec.max_bytes
    if spec.url:
        _fetch_url(spec.url, out, limit)
    else:
        _fetch_hf(spec, out, limit)
    return out


def _offline_error(url: str) -> GptlabError:
    host = urllib.parse.urlparse(url).hostname
    return GptlabError(f"cannot reach {host}: no network? download it elsewhere and pass the file with --data")


def _fetch_url(url: str, out: Path, limit: int | None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "gptlab"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        raise GptlabError(f"download of {url} failed: HTTP {e.code} {e.reason}", "check the URL, or try again later") from None
    except OSError:  # URLError, refused, DNS failure, timeout
        raise _offline_error(url) from None
    length = int(response.headers.get("Content-Length") or 0) or None
    written, line_end = 0, 0  # line_end: bytes up to the last newline, where a capped download is cut
    with response, atomic_write(out, "wb") as f, tqdm(total=min(filter(None, [length, limit]), default=None), unit="B", unit_scale=True, desc=out.name) as bar:
        try:
            for chunk in iter(partial(response.read, CHUNK), b""):
                if limit:
                    chunk = chunk[: limit - written]
                f.write(chunk)
                bar.update(len(chunk))
                if b"\n" in chunk:
                    line_end = written + chunk.rindex(b"\n") + 1
                written += len(chunk)
                if limit and written >= limit:
                    f.truncate(line_end or written)  # no half line at the end
                    break
        except OSError:
            raise GptlabError(f"download of {url} stopped after {written} bytes", "check the network and run it again") from None
        if length and not limit and written < length:
            raise GptlabError(f"download of {url} ended early ({written} of {length} bytes)", "run it again")


def _fetch_hf(spec: KnownDataset, out: Path, limit: int | None) -> None:
    from gptlab.text.sources import iter_source_documents

    source = SourceConfig(path=f"hf:{spec.hf}", hf_config=spec.hf_config, split=spec.split, text_field=spec.text_field, documents="record", streaming=True)
    written = 0
    with atomic_write(out, "w") as f, tqdm(total=limit, unit="B", unit_scale=True, desc=out.name) as bar:
        for doc in iter_source_documents(source):
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            size = len(line.encode("utf-8"))
            written += size
            bar.update(size)
            if limit and written >= limit:
                break


def format_datasets() -> str:
    """The table `gptlab data download --list` prints."""
    rows = list_datasets()
    width = max(len(r["name"]) for r in rows)
    return "\n".join(f"{r['name'].ljust(width)}  {r['size']:>8}  {r['description']}" for r in rows)
