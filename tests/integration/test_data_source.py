"""The Parquet token source on real files, through fsspec, on local disk and on S3 (moto):
the samples are the right windows of the token stream, a restored source continues exactly,
reads are retried when they fail and refused when their bytes are wrong, and a rank reads
only the row groups that hold its samples."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from orchestrator.checkpoint.storage import Storage
from orchestrator.data import TokenDataset, TokenSource
from orchestrator.data.dataset import RowGroupRef
from orchestrator.data.prepare import byte_tokens, prepare, stdlib_sources
from orchestrator.errors import DatasetError

CORPUS = {"max_bytes": 6000, "chunk_tokens": 129, "rows_per_shard": 8, "row_group_rows": 4}
SEQ = 32


@pytest.fixture
def corpus(storage_url):
    url = f"{storage_url}/corpus"
    prepare(url, **CORPUS)
    return url


def source(url_or_dataset, *, rank=0, world=1, batch=8, seed=0, prefetch=2, **kw):
    dataset = (url_or_dataset if isinstance(url_or_dataset, TokenDataset)
               else TokenDataset(url_or_dataset, sleep=lambda s: None))
    return TokenSource(dataset, seq_len=SEQ, global_batch=batch, rank=rank, world_size=world,
                       seed=seed, prefetch=prefetch, **kw)


def test_each_sample_is_a_window_of_the_corpus_token_stream(corpus):
    tokens, _ = byte_tokens(stdlib_sources(), CORPUS["max_bytes"])
    chunk = CORPUS["chunk_tokens"]
    src = source(corpus)
    per_chunk = (chunk - 1) // SEQ
    assert src.num_samples == (len(tokens) // chunk) * per_chunk
    seen = []
    for _ in range(6):
        batch = src.next_batch()
        for row, sample in enumerate(batch.sample_ids):
            c, w = divmod(sample, per_chunk)
            start = c * chunk + w * SEQ
            want = tokens[start:start + SEQ + 1].astype(np.int64)
            assert batch.inputs[row].tolist() == want[:-1].tolist()
            assert batch.targets[row].tolist() == want[1:].tolist()
        seen.extend(batch.sample_ids)
    assert len(set(seen)) == len(seen)  # within an epoch no sample repeats
    src.close()


def test_a_restored_source_continues_with_exactly_the_next_samples_at_any_world_size(corpus):
    a = source(corpus, batch=12)
    for _ in range(17):  # past the end of the first epoch (180 samples)
        a.next_batch()
    saved = a.state_dict()
    assert int(saved["epoch"]) == 1 and int(saved["index"]) == 17 * 12 - a.num_samples
    expected = [a.next_batch().sample_ids for _ in range(5)]
    a.close()
    for world in (1, 2, 3, 4):
        ranks = [source(corpus, rank=r, world=world, batch=12) for r in range(world)]
        for r in ranks:
            r.next_batch()  # a position the restore must move away from
            r.load_state_dict(saved)
        got = [tuple(s for r in ranks for s in r.next_batch().sample_ids) for _ in range(5)]
        assert got == expected, world
        for r in ranks:
            r.close()


def test_a_resume_on_other_data_another_seed_or_sequence_length_is_refused(corpus, tmp_path):
    saved = source(corpus).state_dict()
    with pytest.raises(DatasetError, match="keep workload.args.seed"):
        source(corpus, seed=1).load_state_dict(saved)
    other = str(tmp_path / "other")
    prepare(other, **{**CORPUS, "max_bytes": 5000})
    with pytest.raises(DatasetError, match="taken on other data"):
        source(other).load_state_dict(saved)
    short = TokenSource(TokenDataset(corpus), seq_len=16, global_batch=8, rank=0, world_size=1,
                        seed=0, prefetch=0)
    with pytest.raises(DatasetError, match="seq_len changed"):
        short.load_state_dict(saved)


def test_prefetch_reads_ahead_and_no_prefetch_reads_in_the_step(corpus):
    ahead = source(corpus, prefetch=3)
    first = ahead.next_batch()
    assert sorted(ahead._pending) == [8, 16, 24]  # the next three global batches
    plain = source(corpus, prefetch=0)
    assert plain.next_batch().sample_ids == first.sample_ids
    assert plain._pool is None and not plain._pending
    ahead.close()


def test_a_rank_reads_only_the_row_groups_that_hold_its_samples(corpus):
    dataset = TokenDataset(corpus)
    reads: list[RowGroupRef] = []
    real = dataset.read_row_group
    dataset.read_row_group = lambda ref: reads.append(ref) or real(ref)
    src = source(dataset, rank=1, world=4, batch=8, prefetch=0)
    ids = [s for _ in range(3) for s in src.next_batch().sample_ids]
    needed = {dataset.locate(s // src.per_chunk)[0] for s in ids}
    assert set(reads) == needed and len(reads) == len(needed)  # each read once, cached
    total = sum(len(s.row_groups) for s in dataset.manifest.shards)
    assert len(needed) < total


class FlakyLocal(LocalFileSystem):
    """Local files whose reads fail with EIO the first `failures` times (a flaky NFS mount)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        fs = self
        real_read = f.read

        def read(*args):
            if fs.failures > 0:
                fs.failures -= 1
                raise OSError(errno.EIO, "Input/output error")
            return real_read(*args)

        f.read = read
        return f


def flaky_dataset(url: str, failures: int) -> TokenDataset:
    storage = Storage(url)
    dataset = TokenDataset(url, fs_storage=storage, sleep=lambda s: None)
    storage.fs = FlakyLocal(failures)
    return dataset


def test_transient_read_errors_are_retried_and_the_step_gets_its_batch(tmp_path):
    url = str(tmp_path / "corpus")
    prepare(url, **CORPUS)
    good = [source(url, prefetch=0).next_batch() for _ in range(1)][0]
    dataset = flaky_dataset(url, failures=3)
    batch = source(dataset, prefetch=1).next_batch()
    assert batch.sample_ids == good.sample_ids and batch.inputs.equal(good.inputs)
    assert dataset.retries == 3

    hopeless = flaky_dataset(url, failures=10**6)
    with pytest.raises(DatasetError, match=r"shard-0000\d.parquet cannot be read .*Input/output"):
        source(hopeless, prefetch=1).next_batch()


def test_a_shard_damaged_during_the_run_is_an_error_naming_it_never_retried(tmp_path):
    url = str(tmp_path / "corpus")
    prepare(url, **CORPUS)
    shard = tmp_path / "corpus" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x01  # inside the first data page: its CRC no longer matches
    shard.write_bytes(bytes(data))
    dataset = TokenDataset(url, sleep=lambda s: None)
    with pytest.raises(DatasetError, match="shard-00001.parquet cannot be read .*CRC"):
        dataset.read_row_group(RowGroupRef(1, 0))
    assert dataset.retries == 0

    shard.unlink()
    with pytest.raises(DatasetError, match="shard-00001.parquet is missing"):
        TokenDataset(url).read_row_group(RowGroupRef(1, 0))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"tokens": pa.array([[1, 2]] * 8, pa.list_(pa.int64()))}), shard)
    with pytest.raises(DatasetError, match="shard-00001.parquet has schema .*expected column"):
        TokenDataset(url).read_row_group(RowGroupRef(1, 0))


def test_check_names_the_bad_shard_and_verify_passes_a_good_dataset(corpus):
    dataset = TokenDataset(corpus)
    seen = []
    dataset.check(progress=lambda i, n, name: seen.append((i, n, name)))
    assert [s[2] for s in seen] == [s.name for s in dataset.manifest.shards]
    storage = Storage(corpus)
    manifest = json.loads(storage.read_bytes("dataset.json"))
    manifest["shards"][1]["xxh3_64"] = "0" * 16
    storage.write_atomic(json.dumps(manifest).encode(), "dataset.json")
    with pytest.raises(DatasetError, match=r"shard-00001.parquet: checksum [0-9a-f]{16} differs"):
        TokenDataset(corpus).check()
    TokenDataset(corpus).check(checksums=False)  # sizes and footers still agree


def test_prepare_refuses_a_folder_that_holds_a_dataset(corpus):
    with pytest.raises(DatasetError, match="exists already"):
        prepare(corpus, **CORPUS)
