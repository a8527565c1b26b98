"""shakti-jax: the Shakti small language models in pure JAX."""
