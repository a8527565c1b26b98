"""Data pipelines: the embedded default corpus and the sentencepiece tokenizer."""
