"""Text sources: read a corpus as a stream of documents.

A source (`[[data.sources]]`, a `SourceConfig`) is one of

    path = "corpus.txt"            a text file (any name that is not .jsonl/.json/.parquet reads as text)
    path = "books/"                a folder: every .txt/.md file under it, recursively, in sorted order
    path = "shards/*.txt"          a glob (recursive ** allowed)
    path = "stories.jsonl"         JSON lines: field `text_field` of each record (.json: a list of records)
    path = "train.parquet"         column `text_field`, read one row group batch at a time
    path = "hf:roneneldan/TinyStories"   a Hugging Face dataset (`split`, `hf_config`, `streaming`)
    path = "hf:/data/saved"        ...or a local folder: `Dataset.save_to_disk` output, or a folder of data files

and is cut into documents by `documents`:

    separator    the `separator` string (a line `<|endoftext|>` in TinyStories) ends a document
    blank_lines  one or more blank lines end a document (paragraphs)
    line         every non-empty line is a document
    file         a whole file is one document (records: all records of a file)
    record       one document per record (jsonl/json/parquet/hf)
    auto         separator for text files, record for records

`group_by = "chapter"` joins consecutive records with the same value of that field
(comma-separated for several: "book,chapter") into one document.

Text is read as a stream, a bounded piece at a time, so a file larger than memory
is fine. It is strict UTF-8: a non-UTF-8 or binary file is an error naming the file
and the byte offset, unless `encoding_errors = "replace"`. A BOM is dropped and CRLF
becomes LF. Documents come out stripped of surrounding whitespace; empty ones are
skipped. Weights (`weight`) are not applied here: the data stage repeats sources.
"""

from __future__ import annotations

import codecs
import glob
import itertools
import json
import socket
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from gptlab.config import SourceConfig, TextConfig
from gptlab.errors import GptlabError
from gptlab.text.normalize import GUTENBERG_END, GUTENBERG_START, Normalizer

HF_PREFIX = "hf:"
FORMAT_OF_SUFFIX = {".txt": "txt", ".md": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
RECORD_FORMATS = ("jsonl", "json", "parquet", "hf")
LINE_LIMIT = 1 << 20  # characters; a longer line is read in pieces so memory stays bounded
GUTENBERG_HEADER_LINES = 1000  # the START marker is looked for in a file's first lines only
RECORD_BATCH = 1024  # parquet / HF rows decoded at a time
ENCODING_FIX = 'convert it to UTF-8, or set encoding_errors = "replace" on this source to decode it with replacement characters'


def source_label(source: SourceConfig) -> str:
    """The name a source goes by in meta.json and reports: its label, else its path."""
    return source.label or source.path


# --------------------------------------------------------------------------- finding files


def _suffix_format(path: Path) -> str:
    return FORMAT_OF_SUFFIX.get(path.suffix.lower(), "txt")


def _resolve(source: SourceConfig) -> tuple[str, list[Path]]:
    """(format, files) of a local source; a missing path, an empty folder or glob, or mixed formats raise."""
    raw = source.path
    path = Path(raw).expanduser()
    wanted = {s for s, f in FORMAT_OF_SUFFIX.items() if source.format in ("auto", f)}
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in wanted and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )  # fmt: skip
        if not files:
            raise GptlabError(f"no {'/'.join(sorted(wanted))} files under {path}", "point path at the files, or set format")
    elif any(c in raw for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise GptlabError(f"no files match {raw}", "check the pattern (use ** to search sub-folders)")
    else:
        raise GptlabError(f"source path not found: {raw}", "check the path in [[data.sources]] (or --data)")
    if source.format != "auto":
        return source.format, files
    formats = {_suffix_format(f) for f in files}
    if len(formats) > 1:
        raise GptlabError(f"{raw} mixes file formats ({', '.join(sorted(formats))})", 'set format = "txt" (or jsonl, json, parquet), or narrow the path with a glob')
    return formats.pop(), files


def resolve_source_files(source: SourceConfig) -> list[Path]:
    """The local files a source reads, in reading order ([] for a Hugging Face dataset)."""
    return [] if source_format(source) == "hf" else _resolve(source)[1]


def source_format(source: SourceConfig) -> str:
    """txt, jsonl, json, parquet or hf: `format`, or picked from the `hf:` prefix / the files' extensions."""
    if source.format == "hf" or (source.format == "auto" and source.path.startswith(HF_PREFIX)):
        return "hf"
    return _resolve(source)[0]


# --------------------------------------------------------------------------- reading text files


def _first_offset(path: Path, check: Callable[[bytes], int | None]) -> int:
    """Byte offset of the first problem `check` finds, scanning the file in chunks."""
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(partial(f.read, 1 << 20), b""):
            found = check(chunk)
            if found is not None:
                return offset + found
            offset += len(chunk)
    return offset


def _invalid_utf8_offset(path: Path) -> tuple[int, bytes]:
    decoder = codecs.getincrementaldecoder("utf-8")()

    def check(chunk: bytes) -> int | None:
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as e:
            return e.start - pending
        return None

    offset = _first_offset(path, check)
    with open(path, "rb") as f:
        f.seek(offset)
        return offset, f.read(4)


def decode_error(path: Path) -> GptlabError:
    offset, sample = _invalid_utf8_offset(path)
    return GptlabError(f"{path} is not UTF-8 text: invalid byte at offset {offset} ({sample!r}...)", ENCODING_FIX)


def binary_error(path: Path) -> GptlabError:
    offset = _first_offset(path, lambda chunk: chunk.find(b"\x00") if b"\x00" in chunk else None)
    return GptlabError(f"{path} looks binary, not text: NUL byte at offset {offset}", ENCODING_FIX)


def read_lines(path: Path, errors: str = "strict") -> Iterator[str]:
    """A text file as lines ("\\n"-terminated; a line over LINE_LIMIT characters comes in pieces).

    Strict UTF-8 (errors="replace": replacement characters); the BOM dropped; CRLF and CR read as LF.
    """
    with open(path, encoding="utf-8-sig", errors=errors, newline=None) as f:
        try:
            for line in iter(partial(f.readline, LINE_LIMIT), ""):
                if "\x00" in line:  # NUL is valid UTF-8 but no text file holds it
                    if errors == "strict":
                        raise binary_error(path)
                    line = line.replace("\x00", "\ufffd")
                yield line
        except UnicodeDecodeError:
            raise decode_error(path) from None


def read_text(path: Path, errors: str = "strict") -> str:
    return "".join(read_lines(path, errors))


def _cut_gutenberg(lines: Iterator[str]) -> Iterator[str]:
    """The lines of a Project Gutenberg file between its START and END markers (all lines if it has none)."""
    head = list(itertools.islice(lines, GUTENBERG_HEADER_LINES))
    start = next((i + 1 for i, line in enumerate(head) if GUTENBERG_START.match(line)), 0)
    for line in itertools.chain(head[start:], lines):
        if GUTENBERG_END.match(line):
            return
        yield line


# --------------------------------------------------------------------------- document boundaries


def _split_separator(lines: Iterable[str], separator: str) -> Iterator[str]:
    doc: list[str] = []
    held = ""  # the end of a piece of a long line: it may be the start of a separator cut in two
    for piece in lines:
        if not held and piece.endswith("\n") and separator not in piece:  # the common case, kept fast
            doc.append(piece)
            continue
        *ends, rest = (held + piece).split(separator)
        for part in ends:
            yield "".join(doc) + part
            doc = []
        keep = 0 if rest.endswith("\n") else min(len(rest), len(separator) - 1)
        doc.append(rest[: len(rest) - keep])
        held = rest[len(rest) - keep :]
    yield "".join(doc) + held


def _split_blank_lines(lines: Iterable[str]) -> Iterator[str]:
    """Paragraphs; `lines` must be whole lines (a piece of a long line may look blank)."""
    doc: list[str] = []
    for line in lines:
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc)
            doc = []
    yield "".join(doc)


def _split_lines(lines: Iterable[str]) -> Iterator[str]:
    """Whole lines, re-joining the pieces of lines longer than LINE_LIMIT."""
    pieces: list[str] = []
    for piece in lines:
        pieces.append(piece)
        if piece.endswith("\n"):
            yield "".join(pieces)
            pieces = []
    yield "".join(pieces)


def _whole(lines: Iterable[str]) -> Iterator[str]:
    yield "".join(lines)


SPLITTERS: dict[str, Callable[[Iterable[str], SourceConfig], Iterator[str]]] = {
    "separator": lambda lines, source: _split_separator(lines, source.separator),
    "blank_lines": lambda lines, source: _split_blank_lines(_split_lines(lines)),
    "line": lambda lines, source: _split_lines(lines),
    "file": lambda lines, source: _whole(lines),
}


def _documents_mode(source: SourceConfig, fmt: str) -> str:
    mode = source.documents
    if mode == "auto":
        mode = "record" if fmt in RECORD_FORMATS else "separator"
    if fmt not in RECORD_FORMATS:
        if mode == "record":
            raise GptlabError(f'source {source_label(source)}: documents = "record" needs records (jsonl, json, parquet, hf)', 'for text use "separator", "blank_lines", "line" or "file"')
        if source.group_by:
            raise GptlabError(f"source {source_label(source)}: group_by needs records (jsonl, json, parquet, hf)", "remove group_by for a text source")
    if mode == "file" and fmt == "hf":
        raise GptlabError(f'source {source_label(source)}: documents = "file" has no meaning for a Hugging Face dataset', 'use "record" or group_by')
    if mode == "separator" and not source.separator:
        raise GptlabError(f"source {source_label(source)}: separator is empty", 'set separator, e.g. "<|endoftext|>"')
    return mode


def _iter_text_documents(files: list[Path], source: SourceConfig, mode: str, strip_gutenberg: bool) -> Iterator[str]:
    for path in files:
        lines = read_lines(path, source.encoding_errors)
        if strip_gutenberg:
            lines = _cut_gutenberg(lines)
        yield from SPLITTERS[mode](lines, source)


# --------------------------------------------------------------------------- records


def _iter_jsonl(path: Path, source: SourceConfig) -> Iterator[Any]:
    for lineno, line in enumerate(_split_lines(read_lines(path, source.encoding_errors)), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path}:{lineno} is not valid JSON: {e.msg} (column {e.colno})", "fix the line or the file") from None


def _iter_json(path: Path, source: SourceConfig) -> Iterator[Any]:
    """A list of records, or an object holding one list of records (or a single record)."""
    try:
        data = json.loads(read_text(path, source.encoding_errors))
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})", "fix the file, or use .jsonl for one record per line") from None
    if isinstance(data, dict) and source.text_field not in data:
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise GptlabError(f"{path}: expected a list of records, or an object with one list of them", "reshape the file, or convert it to .jsonl")
        data = lists[0]
    yield from data if isinstance(data, list) else [data]


def _group_fields(source: SourceConfig) -> list[str]:
    return [f.strip() for f in source.group_by.split(",")] if source.group_by else []


def _iter_parquet(path: Path, source: SourceConfig) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for non-parquet data
        raise GptlabError(f"{path} is not a readable parquet file: {e}", "check the file") from None
    columns = [source.text_field, *_group_fields(source)]
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise GptlabError(f"{path} has no column {missing[0]!r}", f"set text_field/group_by to one of: {', '.join(parquet.schema_arrow.names)}")
    for batch in parquet.iter_batches(batch_size=RECORD_BATCH, columns=columns):
        yield from batch.to_pylist()


def check_hub_reachable(name: str, fix: str = "download it elsewhere and pass the files as a local path "
                        "(or hf:/path/to/saved_dataset)") -> None:
    """Fail in a second, not after minutes of retries, when the Hub cannot be reached for hf:`name`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or urllib.request.getproxies():
        return  # offline mode reads the cache; behind a proxy only `datasets` itself can tell
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError:
        raise GptlabError(f"cannot reach {url.hostname} for hf:{name}: no network?",
                          f"{fix}; HF_HUB_OFFLINE=1 uses a copy already in the Hugging Face cache") from None


def _load_hf(source: SourceConfig):
    import datasets

    name = source.path.removeprefix(HF_PREFIX)
    local = Path(name).expanduser()
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():  # Dataset.save_to_disk output
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise GptlabError(f"{local} has no split {source.split!r}", f"set split to one of: {', '.join(ds)}")
                ds = ds[source.split]
            return ds
        if not local.is_dir():
            check_hub_reachable(name)
        return datasets.load_dataset(str(local) if local.is_dir() else name, source.hf_config, split=source.split, streaming=source.streaming)
    except ConnectionError as e:
        raise GptlabError(f"cannot load hf:{name}: {e}", "no network? download it elsewhere and pass the files as a local path") from None
    except (FileNotFoundError, ValueError) as e:  # unknown dataset, config or split; no data files
        raise GptlabError(f"cannot load hf:{name}: {str(e).splitlines()[0]}", "check the name, hf_config and split") from None


def _iter_hf(source: SourceConfig) -> Iterator[dict]:
    ds = _load_hf(source)
    columns = [source.text_field, *_group_fields(source)]
    if ds.column_names is not None:  # a streamed dataset may not know its columns before reading
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise GptlabError(f"hf:{source.path.removeprefix(HF_PREFIX)} has no field {missing[0]!r}", f"set text_field/group_by to one of: {', '.join(ds.column_names)}")
        ds = ds.select_columns(columns)
    try:
        for batch in ds.iter(batch_size=RECORD_BATCH):
            for i in range(len(next(iter(batch.values()), []))):
                yield {c: batch[c][i] for c in batch}
    except ConnectionError as e:
        raise GptlabError(f"lost the connection while streaming {source.path}: {e}", "retry, or download it first") from None


RECORD_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet}


def _iter_records(fmt: str, files: list[Path], source: SourceConfig) -> Iterator[tuple[Any, Any]]:
    """(unit, record): the unit is the file a record came from (one unit for a HF dataset)."""
    if fmt == "hf":
        yield from ((0, record) for record in _iter_hf(source))
        return
    for path in files:
        yield from ((path, record) for record in RECORD_READERS[fmt](path, source))


def _record_text(record: Any, source: SourceConfig, unit: Any) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or source.text_field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise GptlabError(f"{unit if unit else source_label(source)}: a record has no field {source.text_field!r} (it has: {keys})", "set text_field on this source")
    text = record[source.text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise GptlabError(f"{unit if unit else source_label(source)}: field {source.text_field!r} holds {type(text).__name__}, not text", "set text_field to a text field")
    return text


def _group_key(mode: str, fields: list[str], source: SourceConfig) -> Callable[[tuple[Any, Any]], Any]:
    """What consecutive (unit, record) items must share to join into one document."""

    def key(item: tuple[Any, Any]) -> Any:
        unit, record = item
        if mode == "file":
            return unit
        if not isinstance(record, dict) or any(f not in record for f in fields):
            raise GptlabError(f"{unit or source_label(source)}: a record lacks group_by field(s) {source.group_by!r}", "fix group_by")
        return (unit, *(record[f] for f in fields))

    return key


def _iter_record_documents(fmt: str, files: list[Path], source: SourceConfig, mode: str) -> Iterator[str]:
    records = _iter_records(fmt, files, source)
    fields = _group_fields(source)
    if mode == "file" or fields:
        groups = itertools.groupby(records, _group_key(mode, fields, source))
        texts = ("\n".join(_record_text(r, source, u) for u, r in group) for _, group in groups)
    else:
        texts = (_record_text(r, source, u) for u, r in records)
    if mode in ("record", "file"):
        yield from texts
    else:  # cut each record's text further: separator, blank_lines or line
        for text in texts:
            yield from SPLITTERS[mode](text.splitlines(keepends=True), source)


# --------------------------------------------------------------------------- the API


def iter_source_documents(source: SourceConfig, strip_gutenberg: bool = False) -> Iterator[str]:
    """The documents of one source, in order: stripped, non-empty, not normalised.

    The path, format and boundary settings are checked now; reading happens as the
    iterator is consumed. `strip_gutenberg=True` keeps only the lines between a text
    file's Project Gutenberg START and END markers (`iter_documents` sets it when
    `text.normalize` has "strip_gutenberg", so any `documents` mode works for a
    Gutenberg book).
    """
    fmt = source_format(source)
    files = [] if fmt == "hf" else _resolve(source)[1]
    mode = _documents_mode(source, fmt)
    if fmt in RECORD_FORMATS:
        raw = _iter_record_documents(fmt, files, source, mode)
    else:
        raw = _iter_text_documents(files, source, mode, strip_gutenberg)
    return _stripped_nonempty(raw, source)


def _stripped_nonempty(raw: Iterator[str], source: SourceConfig) -> Iterator[str]:
    count = 0
    for doc in raw:
        doc = doc.strip()
        if doc:
            count += 1
            yield doc
    if not count:
        raise GptlabError(f"source {source_label(source)} is an empty corpus: it holds no text", "check the path and, for records, text_field")


def iter_documents(sources: list[SourceConfig], text: TextConfig | None = None) -> Iterator[tuple[int, str]]:
    """(source index, normalised document) for every source in order; empty documents skipped, weights NOT applied."""
    text = text or TextConfig()
    normalize = Normalizer(text)
    cut_gutenberg = "strip_gutenberg" in text.normalize
    for index, source in enumerate(sources):
        count = 0
        for doc in iter_source_documents(source, strip_gutenberg=cut_gutenberg):
            doc = normalize(doc).strip()
            if doc:
                count += 1
                yield index, doc
        if not count:
            raise GptlabError(f"source {source_label(source)}: every document is empty after normalisation", "check text.normalize and text.regex_rules")
