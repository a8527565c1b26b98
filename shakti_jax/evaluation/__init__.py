"""Evaluation: one request interface (token-level log-likelihoods) and backends for JAX
checkpoints, GGUF files (llama.cpp) and HF folders (transformers)."""
