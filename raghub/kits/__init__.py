"""Kits: machinery shared by particular plugins, never imported by the core.

`pretrained` and `attention` serve the transformers model backends, `embedded` finds the
embedded models' wheels, `vector_index` and `trainable` serve the embedding retrievers
(FAISS, sentence-transformers) and the trainer. A plugin imports the public API
(`from raghub import ...`) and any kit; the core (`raghub/` outside this package) imports no kit.
"""
