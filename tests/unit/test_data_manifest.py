"""dataset.json is untrusted input: anything but a well-formed manifest is a DatasetError
with a message, never another exception, and no name from it can leave the dataset."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from orchestrator.data.manifest import DatasetManifest, ShardInfo, parse_manifest
from orchestrator.errors import DatasetError

GOOD = DatasetManifest(vocab_size=257, eod_token=256, chunk_tokens=129, tokenizer="bytes",
                       shards=(ShardInfo(name="shard-00000.parquet", rows=8, row_groups=(4, 4),
                                         bytes=100, xxh3_64="0123456789abcdef"),))


def with_change(change) -> bytes:
    raw = json.loads(GOOD.to_json())
    change(raw)
    return json.dumps(raw).encode()


def test_a_good_manifest_round_trips():
    assert parse_manifest(GOOD.to_json(), "x") == GOOD


@pytest.mark.parametrize("name", ["../shard.parquet", "/etc/shard.parquet", "a/b.parquet",
                                  "a\\b.parquet", "..parquet", "shard.txt", "", ".hidden.parquet",
                                  "x" * 300 + ".parquet", 7, None])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused(name):
    data = with_change(lambda raw: raw["shards"][0].update(name=name))
    with pytest.raises(DatasetError, match="is not a plain file name"):
        parse_manifest(data, "x")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(format="other"), "not a dataset manifest"),
    (lambda r: r.update(format_version=2), "format_version 2"),
    (lambda r: r.update(dtype="int64"), "dtype uint16"),
    (lambda r: r.update(vocab_size=True), "'vocab_size' must be an integer"),
    (lambda r: r.update(vocab_size=70000), "'vocab_size' must be an integer from 2 to 65536"),
    (lambda r: r.update(eod_token=257), "'eod_token'"),
    (lambda r: r.update(chunk_tokens=10**9), "'chunk_tokens'"),
    (lambda r: r.update(shards=[]), "'shards' must be a list of 1"),
    (lambda r: r["shards"][0].update(row_groups=[4, 5]), "adding up to rows=8"),
    (lambda r: r["shards"][0].update(rows=-1), "'rows'"),
    (lambda r: r["shards"][0].update(xxh3_64="zz"), "16 hex digits"),
    (lambda r: r["shards"].append(dict(r["shards"][0])), "listed twice"),
])
def test_each_bad_field_is_named(change, message):
    with pytest.raises(DatasetError, match=message):
        parse_manifest(with_change(change), "s3://b/data/dataset.json")


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[]", b"null", b"{", b'{"format": 1}'])
def test_bytes_that_are_not_a_manifest_are_refused(data):
    with pytest.raises(DatasetError, match="not a dataset manifest"):
        parse_manifest(data, "x")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.sampled_from(["format", "format_version", "column", "dtype",
                                        "tokenizer", "vocab_size", "eod_token", "chunk_tokens",
                                        "shards", "other"]), json_values))
@settings(max_examples=200, deadline=None)
def test_arbitrary_json_is_a_manifest_or_a_dataset_error(fields):
    raw = {**json.loads(GOOD.to_json()), **fields}
    try:
        m = parse_manifest(json.dumps(raw).encode(), "x")
    except DatasetError:
        return
    assert all("/" not in s.name and ".." not in s.name for s in m.shards)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_are_a_dataset_error(data):
    with pytest.raises(DatasetError):
        parse_manifest(data, "x")
