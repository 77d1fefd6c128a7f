"""Built-in retrievers: bm25 (bm25s), bm25-rank (rank-bm25), dense (sentence-transformers + FAISS)."""
