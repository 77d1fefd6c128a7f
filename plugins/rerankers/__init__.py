"""Built-in rerankers: lm (UPR: the run's model scores log p(question | passage)), embedding (the
dense encoder's cosine) and cross-encoder (a sentence-transformers CrossEncoder)."""
