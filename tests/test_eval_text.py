"""The evaluation text (`--eval`): only about the bytes scored (`--eval-bytes`) are read, so a
large corpus costs no more memory or time than its first megabyte; what is read is the same
text a whole read would give."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymerge.errors import InputError
from raymerge.scoring import read_text

DOCS = [f"document {i}: " + "words and more words " * (i % 7 + 1) for i in range(3000)]


def _whole(max_bytes: int) -> str:
    """What scoring the first ``max_bytes`` means: the documents joined by blank lines, cut."""
    return "\n\n".join(DOCS).encode()[:max_bytes].decode(errors="ignore")


def test_jsonl_is_read_only_up_to_the_bytes_scored(tmp_path):
    """Lines after the scored bytes are never read: a broken line there is not met."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS) + "{not json\n")
    assert read_text(str(path), "text", 5000) == _whole(5000)
    with pytest.raises(InputError, match="line 3001 is not JSON"):
        read_text(str(path), "text", 10**9)


def test_parquet_is_read_only_up_to_the_bytes_scored(tmp_path):
    """Row groups after the scored bytes are never read: a corrupt one there is not met."""
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), path, row_group_size=1000, use_dictionary=False,
                   compression="snappy")
    assert read_text(str(path), "text", 5000) == _whole(5000)
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(1)  # the last row group's texts
    raw = bytearray(path.read_bytes())
    start, size = chunk.data_page_offset, chunk.total_compressed_size
    raw[start + size // 4:start + size // 2] = b"\xff" * (size // 2 - size // 4)  # its text pages: garbage
    path.write_bytes(bytes(raw))
    assert read_text(str(path), "text", 5000) == _whole(5000)
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_text(str(path), "text", 10**9)
