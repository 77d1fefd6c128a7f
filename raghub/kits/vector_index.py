"""What the embedding retrievers share (`dense`, `dpr`): passage embeddings and a FAISS
inner-product index over them, each cached by fingerprint. They are two cache entries:
changing only the index reuses the embeddings.

The embeddings are encoded shard by shard into `<entry>.shards/<shard size>/` (a killed build
restarts after its last finished shard of the same size), then assembled into one
memory-mapped `.npy` (float32, or float16 to halve it), only when their rows are the corpus's
passages, so a corpus larger than memory is embedded in bounded memory. Any FAISS
`index_factory` string (`Flat`, `IVF4096,PQ64`, `HNSW32`, ...) can be built; an index that needs
training trains on a sample. The index is built on the GPUs when FAISS has GPU support and
sees one."""

from __future__ import annotations

import math
import os
import shutil
from abc import abstractmethod
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from raghub import distributed
from raghub.checkpoints import CHECKPOINT_OPTION, PASSAGE_ENCODER, Checkpoint, read_checkpoint
from raghub.errors import RunError, UsageError
from raghub.interfaces import Passage, Retriever
from raghub.kits.pretrained import with_folder_contents
from raghub.options import Option

if TYPE_CHECKING:  # pragma: no cover
    import faiss

    from raghub.kits.trainable import TrainableEncoders

INDEX_TYPES = ("flat", "ivf", "hnsw")
HNSW_NEIGHBOURS = 32
#: FAISS wants at least this many training points per IVF cluster
IVF_POINTS_PER_LIST = 39
#: embedding rows converted to float32 and added to the index at a time
ADD_ROWS = 65536
#: options that leave results unchanged, and options left out of the fingerprint at their
#: default, so that runs from before they existed keep their fingerprint
NOT_IN_RESULTS = ("encode_batch_size", "embed_shard_size")
NEWER_OPTIONS = ("index_factory", "train_size", "embedding_dtype", "checkpoint")
#: the encoder settings a `raghub train` checkpoint of an embedding retriever was trained from
ENCODER_SETTINGS = ("encoder", "passage_encoder")


def ivf_list_count(n_vectors: int) -> int:
    """IVF clusters for a corpus: FAISS's 4·sqrt(n) rule, capped so each has enough points."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // IVF_POINTS_PER_LIST))


class PassagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} passages/s")


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last one shorter), read lazily."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def on_gpus(index: faiss.Index) -> faiss.Index:
    """The index moved to every GPU FAISS sees; unchanged without FAISS GPU support or a GPU,
    or for an index type FAISS cannot run on a GPU (HNSW)."""
    import faiss

    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:
        return index


class EmbeddingRetriever(Retriever):
    """A retriever that embeds passages and queries and ranks by inner product in a FAISS
    index. Subclasses embed (`embed_passages`, `embed_queries`) and say what the passage
    embeddings depend on (`embedding_key`); their cache entries are `<name>-embeddings` and
    `<name>-index`."""

    options = {
        "index_type": Option(INDEX_TYPES, "flat", "FAISS index: exact flat, ivf clusters or hnsw graph"),
        "index_factory": Option(str, "", "any FAISS index_factory string (Flat, IVF4096,PQ64, HNSW32, ...); "
                                "replaces --index-type when given"),
        "train_size": Option(int, 262144, "passages sampled to train an index that needs training", at_least=1),
        "nprobe": Option(int, 16, "ivf: clusters searched per query", at_least=1),
        "ef_search": Option(int, 128, "hnsw: candidates kept while searching", at_least=1),
        "encode_batch_size": Option(int, 64, "texts embedded per encoder call", at_least=1),
        "embed_shard_size": Option(int, 65536, "passages per on-disk shard of embeddings (the unit a "
                                   "killed build resumes from)", at_least=1),
        "embedding_dtype": Option(("float32", "float16"), "float32", "how the embeddings are stored on disk"),
        "checkpoint": CHECKPOINT_OPTION,
    }

    def __init__(self, cache, **options: Any) -> None:
        super().__init__(cache, **options)
        self.faiss_index: faiss.Index | None = None

    @abstractmethod
    def embed_passages(self, passages: Sequence[Passage]) -> np.ndarray:
        """float32 passage embeddings [len(passages), dim]."""

    @abstractmethod
    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """float32 query embeddings [len(queries), dim]."""

    @abstractmethod
    def embedding_key(self) -> dict[str, Any]:
        """The settings the passage embeddings depend on (encoders, normalisation)."""

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (newer ones only when not at their default), with a
        checkpoint's identity (training fingerprint and step) instead of its path and an encoder
        folder's content beside its path."""
        settings = {key: value for key, value in super().fingerprint().items()
                    if key not in NOT_IN_RESULTS
                    and not (key in NEWER_OPTIONS and value == self.options[key].default)}
        if self.checkpoint:
            settings["checkpoint"] = self.checkpoint.identity
        return with_folder_contents(settings, ENCODER_SETTINGS)

    def encoder_settings(self) -> dict[str, Any]:
        """The encoders this retriever starts from, which a checkpoint must have been trained from."""
        return {key: self.settings[key] for key in ENCODER_SETTINGS if key in self.settings}

    @cached_property
    def checkpoint(self) -> Checkpoint | None:
        """The `--checkpoint` save, or None; refused when trained for another retriever or from
        other encoders."""
        if not self.settings["checkpoint"]:
            return None
        checkpoint = read_checkpoint(self.settings["checkpoint"])
        manifest = checkpoint.manifest
        retriever = manifest.get("retriever", "dense")  # older checkpoints trained `dense` only
        trained_from = manifest.get("retriever_settings", {"encoder": manifest.get("encoder")})
        if retriever != self.name or trained_from != self.encoder_settings():
            given = ", ".join(f"{key}={value}" for key, value in self.encoder_settings().items())
            raise UsageError(f"{self.name}: --checkpoint {self.settings['checkpoint']} was trained for retriever "
                             f"{retriever} from {trained_from}, not for {self.name} with {given}")
        return checkpoint

    def trained_or_given(self, part: str, setting: str) -> str:
        """The checkpoint's trained encoder `part` (QUERY_ENCODER, PASSAGE_ENCODER) when it has
        one, else the encoder the `setting` option names."""
        found = self.checkpoint.part(part) if self.checkpoint else None
        return str(found) if found else self.settings[setting]

    def passage_encoder_identity(self, setting: str) -> dict[str, Any]:
        """What the passage embeddings were made by, under the `setting` key: the checkpoint's
        identity when it trained the passage encoder, else the `setting` option's encoder (and
        an encoder folder's content)."""
        if self.checkpoint and self.checkpoint.part(PASSAGE_ENCODER):
            return {setting: self.checkpoint.identity}
        return with_folder_contents({setting: self.settings[setting]}, [setting])

    def trainable_encoders(self, train_passages: bool) -> TrainableEncoders:
        """The encoders for `raghub train` (the passage encoder too when `train_passages`)."""
        raise UsageError(f"retriever '{self.name}' has no trainable encoders; use dense or dpr")

    def embeddings_entry(self, corpus_fingerprint: str) -> tuple[str, dict[str, Any]]:
        """The cache kind and key of the passage embeddings."""
        key = {"corpus": corpus_fingerprint, **self.embedding_key()}
        if self.settings["embedding_dtype"] != "float32":
            key["dtype"] = self.settings["embedding_dtype"]
        return f"{self.name}-embeddings", key

    def index_entry(self, corpus_fingerprint: str) -> tuple[str, dict[str, Any]]:
        """The cache kind and key of the FAISS index."""
        return f"{self.name}-index", {"corpus": corpus_fingerprint, **self.fingerprint()}

    def prepare(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        """Under several ranks, each embeds its share of the shards (every world_size-th,
        from its rank on), unless the index or the embeddings are cached already; rank 0 then
        assembles them in `index`."""
        here = distributed.ranks()
        if here.world_size == 1 or any(self.cache.is_valid(self.cache.entry_path(*entry)) for entry in (
                self.index_entry(corpus_fingerprint), self.embeddings_entry(corpus_fingerprint))):
            return
        shards = self.cache.entry_path(*self.embeddings_entry(corpus_fingerprint)).with_suffix(".shards")
        self.embed_shards(passages, shards, here.rank, here.world_size)

    def passage_embeddings(self, passages: Sequence[Passage], corpus_fingerprint: str) -> np.ndarray:
        """The passages' embeddings, memory-mapped from the cache (built shard by shard), once
        per corpus and `embedding_key`."""
        kind, key = self.embeddings_entry(corpus_fingerprint)
        shards = self.cache.entry_path(kind, key).with_suffix(".shards")

        def build(folder: Path) -> None:
            rows = [np.load(file, mmap_mode="r") for file in self.embed_shards(passages, shards)]
            total = sum(map(len, rows))
            if total != len(passages):  # a damaged shard: never cache a matrix of other rows
                shutil.rmtree(shards, ignore_errors=True)
                raise RunError(f"{self.name}: the embedding shards in {shards} hold {total} rows for "
                               f"{len(passages)} passages; they are removed: run again to embed the passages afresh")
            out = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=rows[0].dtype,
                                            shape=(total, rows[0].shape[1]))
            start = 0
            for shard in rows:
                out[start : start + len(shard)] = shard
                start += len(shard)
            out.flush()

        embeddings = self.cache.get_or_build(
            kind, key, build, lambda folder: np.load(folder / "embeddings.npy", mmap_mode="r"))
        shutil.rmtree(shards, ignore_errors=True)  # the shards are in the entry now
        return embeddings

    def embed_shards(self, passages: Sequence[Passage], shards: Path, rank: int = 0, world_size: int = 1) -> list[Path]:
        """Each shard of `embed_shard_size` passages encoded into `shards/<size>/` (shards of
        another size are another layout), skipping the shards an earlier, killed build finished
        (each is renamed into place when complete). Of several ranks, rank r encodes shards r,
        r + world_size, ...; returns every shard's file."""
        size, dtype = self.settings["embed_shard_size"], self.settings["embedding_dtype"]
        layout = shards / str(size)
        layout.mkdir(parents=True, exist_ok=True)
        step = self.settings["encode_batch_size"] * 8
        count = math.ceil(len(passages) / size)
        files = [layout / f"{number:06d}.npy" for number in range(count)]
        mine = range(rank, count, world_size)
        label = "embedding passages" + (f" (rank {rank} of {world_size})" if world_size > 1 else "")
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), PassagesPerSecond(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            bar = progress.add_task("embed", total=sum(min(size, len(passages) - n * size) for n in mine))
            for number, chunk in enumerate(chunks(passages, size)):  # one sequential read of a streamed corpus
                if number % world_size != rank:
                    continue
                if files[number].exists():
                    progress.advance(bar, len(chunk))
                    continue
                vectors = []
                for first in range(0, len(chunk), step):
                    vectors.append(self.embed_passages(chunk[first : first + step]).astype(dtype))
                    progress.advance(bar, len(vectors[-1]))
                partial = files[number].with_name(f"{files[number].stem}.partial-{os.getpid()}.npy")
                np.save(partial, np.concatenate(vectors))
                partial.rename(files[number])
        return files

    def factory_string(self, n_vectors: int) -> str:
        """`index_factory` when given, else the one `index_type` stands for."""
        return self.settings["index_factory"] or {
            "flat": "Flat", "ivf": f"IVF{ivf_list_count(n_vectors)},Flat", "hnsw": f"HNSW{HNSW_NEIGHBOURS}",
        }[self.settings["index_type"]]

    def build_index(self, embeddings: np.ndarray) -> faiss.Index:
        """The index over the embeddings (read ADD_ROWS at a time), trained on a sample of
        `train_size` of them (all, in order, when there are no more)."""
        import faiss

        spec = self.factory_string(len(embeddings))
        try:
            index = faiss.index_factory(embeddings.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise UsageError(f"{self.name}: --index-factory {spec!r} is not a FAISS index_factory string "
                             f"({str(error).strip().splitlines()[-1]})") from None
        built = on_gpus(index)
        if not built.is_trained:
            size = min(len(embeddings), self.settings["train_size"])
            rows = np.sort(np.random.default_rng(0).choice(len(embeddings), size, replace=False))
            built.train(np.asarray(embeddings[rows] if size < len(embeddings) else embeddings, dtype=np.float32))
        for first in range(0, len(embeddings), ADD_ROWS):
            built.add(np.asarray(embeddings[first : first + ADD_ROWS], dtype=np.float32))
        return index if built is index else faiss.index_gpu_to_cpu(built)

    def load_index(self, folder: Path) -> faiss.Index:
        """The stored index, with the search-time settings (`nprobe`, `ef_search`) where they apply."""
        import faiss

        index = faiss.read_index(str(folder / "index.faiss"))
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", self.settings["nprobe"]), ("efSearch", self.settings["ef_search"])):
            try:
                space.set_index_parameter(index, name, value)
            except RuntimeError:  # not a parameter of this kind of index
                pass
        return index

    def index(self, passages: Sequence[Passage], corpus_fingerprint: str) -> None:
        if not passages:
            raise UsageError(f"{self.name}: the retrieval corpus has no passages; check the task's corpus")

        def build(folder: Path) -> None:
            import faiss

            index = self.build_index(self.passage_embeddings(passages, corpus_fingerprint))
            faiss.write_index(index, str(folder / "index.faiss"))

        self.faiss_index = self.cache.get_or_build(*self.index_entry(corpus_fingerprint), build, self.load_index)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        if self.faiss_index is None:
            raise RuntimeError("index() must be called before search()")
        k = min(k, self.faiss_index.ntotal)
        if not queries or k <= 0:
            return [[] for _ in queries]
        scores, positions = self.faiss_index.search(self.embed_queries(queries), k)
        return [
            sorted(
                ((int(position), float(score)) for position, score in zip(row_positions, row_scores)
                 if position >= 0),  # IVF / HNSW return -1 when they find fewer than k
                key=lambda pair: (-pair[1], pair[0]),
            )
            for row_positions, row_scores in zip(positions, scores)
        ]
