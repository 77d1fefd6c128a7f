"""A Wikipedia-scale datastore: a streamed DPR-style TSV, sharded resumable dense embeddings
(a build killed with SIGKILL resumes from its finished shards), FAISS index_factory strings."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from raghub import RunError, UsageError
from raghub import corpus as corpus_module
from raghub.cache import Cache, fingerprint, fingerprint_items
from raghub.corpus import CorpusFile, read_corpus
from raghub.plugins.retrievers.bm25 import BM25S
from raghub.plugins.retrievers.dense import DenseRetriever

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def fake_vectors(texts):
    """Deterministic unit vectors from each text's hash: an encoder without a model."""
    rows = [np.frombuffer(hashlib.sha256(text.encode()).digest()[:DIM], dtype=np.uint8) for text in texts]
    vectors = np.asarray(rows, dtype=np.float32) - 127.5
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class FakeDense(DenseRetriever):
    def embed(self, texts, encoder=None):
        return fake_vectors(texts)


def write_psgs(path, n):
    """A psgs_w100.tsv-style file: id, text, title, with DPR's quoting of quotes."""
    rows = [f'{i}\t"Passage {i} says ""word{i}"" about\ttopic {i % 7}."\tTitle {i}' for i in range(1, n + 1)]
    path.write_text("id\ttext\ttitle\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def streamed(monkeypatch):
    monkeypatch.setattr(corpus_module, "STREAM_ABOVE_BYTES", 0)


def test_a_dpr_tsv_is_read_streaming_holding_offsets_only(tmp_path, streamed):
    path = write_psgs(tmp_path / "psgs_w100.tsv", 20_000)
    tracemalloc.start()
    passages = read_corpus(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(passages, CorpusFile) and len(passages) == 20_000
    assert peak < path.stat().st_size / 4  # the texts were not kept
    first, last = passages[0], passages[-1]
    assert (first.id, first.title, first.text) == ("1", "Title 1", 'Passage 1 says "word1" about\ttopic 1.')
    assert (last.id, last.title) == ("20000", "Title 20000")
    assert [p.id for p in passages[5:8]] == ["6", "7", "8"]
    iterated = [p.id for p in passages]  # one sequential read
    assert iterated == [str(i) for i in range(1, 20_001)]
    assert fingerprint_items((p.id, p.title, p.text) for p in passages) == fingerprint(
        [(p.id, p.title, p.text) for p in passages[:]])


def test_a_quoted_field_may_span_lines_in_a_streamed_tsv(tmp_path, streamed):
    path = tmp_path / "c.tsv"
    path.write_text('text\tid\n"two\nlines"\ta\n\nthird\tb\n', encoding="utf-8")
    passages = read_corpus(path)
    assert [(p.id, p.text) for p in passages] == [("a", "two\nlines"), ("b", "third")]
    assert (passages[1].id, passages[0].text) == ("b", "two\nlines")


def test_bm25_indexes_a_streamed_corpus(tmp_path, streamed):
    passages = read_corpus(write_psgs(tmp_path / "psgs.tsv", 500))
    retriever = BM25S(Cache(tmp_path / "cache"))
    retriever.index(passages, "psgs")
    [[(position, _)]] = retriever.search(["word321"], 1)
    assert passages[position].id == "321"


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "IVF4,PQ4", "HNSW8"])
def test_any_index_factory_string_finds_a_passage_by_its_own_embedding(tmp_path, factory):
    passages = read_corpus(write_psgs(tmp_path / "psgs.tsv", 400))
    retriever = FakeDense(Cache(tmp_path / "cache"), index_factory=factory, train_size=300, nprobe=4)
    retriever.index(passages, "psgs")
    assert retriever.faiss_index.ntotal == 400
    found = retriever.search([passages[i].as_text() for i in (3, 250)], 1)
    assert [hits[0][0] for hits in found] == [3, 250] or factory == "IVF4,PQ4"  # PQ is lossy
    assert retriever.fingerprint()["index_factory"] == factory


def test_a_bad_index_factory_string_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="'Nonsense99' is not a FAISS index_factory string"):
        FakeDense(Cache(tmp_path), index_factory="Nonsense99").build_index(fake_vectors(["a", "b"]))


def test_float16_embeddings_are_stored_memory_mapped(tmp_path):
    passages = read_corpus(write_psgs(tmp_path / "psgs.tsv", 50))
    embeddings = FakeDense(Cache(tmp_path), embedding_dtype="float16").passage_embeddings(passages, "psgs")
    assert isinstance(embeddings, np.memmap) and embeddings.dtype == np.float16
    assert np.allclose(embeddings, fake_vectors([p.as_text() for p in passages]), atol=1e-3)


BUILD = """
import sys, time
from test_scale_index import FakeDense, fake_vectors
from raghub.cache import Cache
from raghub.corpus import read_corpus

class Slow(FakeDense):
    def embed(self, texts, encoder=None):
        with open(sys.argv[3], "a") as log:
            log.write(f"{len(texts)}\\n")
        time.sleep(float(sys.argv[4]))
        return fake_vectors(texts)

Slow(Cache(sys.argv[2]), embed_shard_size=10, encode_batch_size=2).passage_embeddings(read_corpus(sys.argv[1]), "psgs")
"""


def test_a_dense_build_killed_with_sigkill_resumes_from_its_last_finished_shard(tmp_path):
    corpus = write_psgs(tmp_path / "psgs.tsv", 80)  # 8 shards of 10
    build = lambda log, delay: [sys.executable, "-c", BUILD, str(corpus), str(tmp_path / "cache"),
                                str(tmp_path / log), str(delay)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    killed = subprocess.Popen(build("killed.log", 0.3), env=env, stderr=subprocess.DEVNULL)
    shards = tmp_path / "cache" / "dense-embeddings"
    deadline = time.monotonic() + 60
    while len(list(shards.glob("*.shards/10/00000[0-9].npy"))) < 2 and killed.poll() is None:
        assert time.monotonic() < deadline, "no shard was finished"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    finished = len(list(shards.glob("*.shards/10/00000[0-9].npy")))
    assert 2 <= finished < 8, "the kill did not come mid-build"
    subprocess.run(build("resumed.log", 0), env=env, check=True, stderr=subprocess.DEVNULL)
    embedded = sum(map(int, (tmp_path / "resumed.log").read_text().split()))
    assert embedded == 80 - 10 * finished  # the finished shards were not embedded again
    [entry] = [folder for folder in shards.iterdir() if folder.is_dir()]  # the shards folder is gone
    whole = FakeDense(Cache(tmp_path / "whole"), embed_shard_size=10).passage_embeddings(read_corpus(corpus), "psgs")
    assert np.array_equal(np.load(entry / "embeddings.npy"), whole)
    assert json.loads((entry / "manifest.json").read_text())["files"].keys() == {"embeddings.npy"}


class Killed(Exception):
    """Stands for the kill of a build."""


def killed_after(shards, **settings):
    """A dense retriever whose build stops after `shards` encoder calls (one per shard here)."""

    class Dying(FakeDense):
        def embed(self, texts, encoder=None):
            nonlocal shards
            if not shards:
                raise Killed
            shards -= 1
            return fake_vectors(texts)

    return Dying(**settings)


def test_the_shards_of_a_killed_build_are_not_reused_at_another_shard_size(tmp_path):
    """Regression: shards of 2 left by a killed build were assembled, at --embed-shard-size
    1000, into 6 rows for 30 passages, and that matrix was cached."""
    passages = read_corpus(write_psgs(tmp_path / "psgs.tsv", 30))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(Killed):
        killed_after(3, cache=cache, embed_shard_size=2).passage_embeddings(passages, "psgs")
    assert len(list(cache.root.rglob("00000?.npy"))) == 3
    embeddings = FakeDense(cache, embed_shard_size=1000).passage_embeddings(passages, "psgs")
    assert np.array_equal(embeddings, fake_vectors([p.as_text() for p in passages]))


def test_shards_that_do_not_add_up_to_the_corpus_are_refused_and_not_cached(tmp_path):
    passages = read_corpus(write_psgs(tmp_path / "psgs.tsv", 30))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(Killed):
        killed_after(2, cache=cache, embed_shard_size=10).passage_embeddings(passages, "psgs")
    [first, _] = sorted(cache.root.rglob("00000?.npy"))
    np.save(first, fake_vectors(["a damaged shard"]))  # 1 row where 10 belong
    with pytest.raises(RunError, match="hold 21 rows for 30 passages"):
        FakeDense(cache, embed_shard_size=10).passage_embeddings(passages, "psgs")
    assert not [folder for folder in (cache.root / "dense-embeddings").iterdir() if cache.is_valid(folder)]
    embeddings = FakeDense(cache, embed_shard_size=10).passage_embeddings(passages, "psgs")  # embedded afresh
    assert np.array_equal(embeddings, fake_vectors([p.as_text() for p in passages]))


class Counting(FakeDense):
    """Records the texts it embeds."""

    def embed(self, texts, encoder=None):
        self.embedded = [*getattr(self, "embedded", []), *texts]
        return fake_vectors(texts)


def test_under_two_ranks_each_embeds_every_other_shard_and_rank_0_assembles_them(tmp_path, monkeypatch):
    from raghub import distributed

    passages = read_corpus(write_psgs(tmp_path / "psgs.tsv", 35))  # 4 shards: 10, 10, 10, 5
    texts = [p.as_text() for p in passages]
    cache, settings = Cache(tmp_path / "cache"), {"embed_shard_size": 10, "encode_batch_size": 4}
    ranks = {}
    for rank in (1, 0):
        monkeypatch.setattr(distributed, "ranks", lambda rank=rank: distributed.Ranks(rank, 2, rank))
        ranks[rank] = Counting(cache, **settings)
        ranks[rank].prepare(passages, "psgs")
    assert ranks[1].embedded == texts[10:20] + texts[30:35]
    assert ranks[0].embedded == texts[0:10] + texts[20:30]
    ranks[0].index(passages, "psgs")  # rank 0 assembles the shards: nothing embedded again
    assert ranks[0].embedded == texts[0:10] + texts[20:30]
    alone = Counting(Cache(tmp_path / "alone"), **settings)
    assert np.array_equal(ranks[0].passage_embeddings(passages, "psgs"), alone.passage_embeddings(passages, "psgs"))
    later = Counting(cache, **settings)
    later.prepare(passages, "psgs")  # the index is cached: no rank embeds anything
    assert not hasattr(later, "embedded")
