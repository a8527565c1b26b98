"""Attention operators: mask specs (`masks`), the dispatching entry point (`attention`), the XLA
reference and the Pallas / splash implementations."""
