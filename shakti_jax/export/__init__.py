"""Edge export: one canonical form of a model, written as GGUF (llama.cpp) or a HF folder."""

from shakti_jax.export.canonical import (CanonicalModel, ExportError, canonicalize, check_exportable,
                                         model_params)
from shakti_jax.export.gguf_export import QUANT_TYPES, write_gguf
from shakti_jax.export.hf_export import write_hf

__all__ = ["CanonicalModel", "ExportError", "QUANT_TYPES", "canonicalize", "check_exportable",
           "model_params", "write_gguf", "write_hf"]
