"""What `raghub train` needs of a retriever: its encoders as torch modules that embed with
gradients, and a save into a checkpoint folder that the retriever's `--checkpoint` reads back
(`EmbeddingRetriever.trainable_encoders`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from raghub.checkpoints import PASSAGE_ENCODER, QUERY_ENCODER
from raghub.interfaces import Passage


class TrainableEncoders(ABC):
    """The query encoder (`query_module`, always trained) and the passage encoder
    (`passage_module`: trained when given, else None and the passage side stays the index's)."""

    def __init__(self, query_module: Any, passage_module: Any | None):
        self.query_module = query_module
        self.passage_module = passage_module

    @abstractmethod
    def embed_queries(self, queries: Sequence[str]) -> Any:
        """Query embeddings [N, d] by the query encoder, with gradients."""

    @abstractmethod
    def embed_passages(self, passages: Sequence[Passage]) -> Any:
        """Passage embeddings [N, d] by the passage encoder, with gradients."""

    @abstractmethod
    def save_module(self, module: Any, folder: Path) -> None:
        """Write one encoder as a folder its retriever loads."""

    def save(self, folder: Path) -> None:
        """The trained encoders into a checkpoint save (QUERY_ENCODER, PASSAGE_ENCODER)."""
        self.save_module(self.query_module, folder / QUERY_ENCODER)
        if self.passage_module is not None:
            self.save_module(self.passage_module, folder / PASSAGE_ENCODER)


def sentence_embeddings(model: Any, texts: Sequence[str]) -> Any:
    """A sentence-transformers model's embeddings of `texts` [N, d], through its torch modules,
    so gradients flow (`encode` runs without them)."""
    from sentence_transformers.util import batch_to_device

    prepare = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` before v6
    return model(batch_to_device(prepare(list(texts)), model.device))["sentence_embedding"]
