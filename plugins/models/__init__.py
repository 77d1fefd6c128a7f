"""Built-in model backends: transformers causal LMs and GGUF files."""
