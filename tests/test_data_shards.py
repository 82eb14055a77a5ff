"""Token shards: the llm.c `.bin` layout, byte for byte, and one clear error for every broken file."""

import numpy as np
import pytest

from gptlab.data.shards import (
    HEADER_BYTES,
    read_header,
    read_shard,
    token_dtype,
    write_shard,
)
from gptlab.errors import GptlabError


def llmc_write_datafile(path, toks, model_desc):
    """llm.c's dev/data/data_common.py write_datafile, transcribed."""
    magic, version, dtype = {"gpt-2": (20240520, 1, np.uint16), "llama-3": (20240801, 7, np.uint32)}[model_desc]
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(toks, dtype=dtype).tobytes())


@pytest.mark.parametrize("dtype,model_desc,top", [(np.uint16, "gpt-2", 50256), (np.uint32, "llama-3", 128_255)])
def test_write_shard_is_byte_identical_to_llmc(tmp_path, dtype, model_desc, top):
    toks = np.random.default_rng(0).integers(0, top + 1, size=1000).astype(dtype)
    write_shard(tmp_path / "ours.bin", toks)
    llmc_write_datafile(tmp_path / "llmc.bin", toks, model_desc)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "llmc.bin").read_bytes()
    back = read_shard(tmp_path / "llmc.bin")
    assert back.dtype == dtype and np.array_equal(back, toks)


def test_write_shard_converts_and_checks_range(tmp_path):
    write_shard(tmp_path / "a.bin", [1, 2, 3], dtype=np.uint16)
    assert read_shard(tmp_path / "a.bin").tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="do not fit"):
        write_shard(tmp_path / "b.bin", np.array([70_000]), dtype=np.uint16)
    assert not (tmp_path / "b.bin").exists()
    with pytest.raises(ValueError, match="uint16 or uint32"):
        write_shard(tmp_path / "c.bin", np.array([1, 2], dtype=np.int64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temp files left behind


def test_empty_shard_round_trips(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, np.uint16))
    assert len(read_shard(tmp_path / "e.bin")) == 0
    assert read_header(tmp_path / "e.bin") == (np.dtype(np.uint16), 0)


@pytest.mark.parametrize(
    "vocab,dtype", [(256, np.uint16), (50257, np.uint16), (65536, np.uint16), (65537, np.uint32), (2**32, np.uint32)]
)
def test_token_dtype_fits_the_vocabulary(vocab, dtype):
    assert token_dtype(vocab) == dtype


def test_vocab_too_large_for_any_dtype():
    with pytest.raises(GptlabError, match="does not fit in uint32"):
        token_dtype(2**32 + 1)


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-7]
    elif how == "extra":
        data += b"\0\0"
    elif how == "header_only_part":
        data = data[:100]
    elif how == "magic":
        data[0:4] = np.int32(12345).tobytes()
    elif how == "version":
        data[4:8] = np.int32(3).tobytes()
    elif how == "count":
        data[8:12] = np.int32(999).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how,detail",
    [
        ("truncated", "header says 100 tokens"),
        ("extra", "header says 100 tokens"),
        ("header_only_part", "shorter than the 1024-byte header"),
        ("magic", "magic number 12345"),
        ("version", "version 3"),
        ("count", "header says 999 tokens"),
    ],
)
def test_corrupt_shard_is_one_clear_line(tmp_path, how, detail):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    assert path.stat().st_size == HEADER_BYTES + 200
    _corrupt(path, how)
    with pytest.raises(GptlabError) as e:
        read_shard(path)
    msg = str(e.value)
    assert msg.startswith(f"truncated or corrupt shard {path}") and detail in msg
    assert "re-run gptlab data prepare" in msg and "\n" not in msg


def test_missing_shard(tmp_path):
    with pytest.raises(GptlabError, match="shard not found"):
        read_shard(tmp_path / "nope.bin")
