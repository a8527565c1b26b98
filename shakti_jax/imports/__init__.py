"""Readers that turn GGUF files and Hugging Face folders into this project's models."""
