"""Open a model to evaluate: a training workdir (JAX), `gguf:PATH` (llama.cpp) or `hf:DIR`
(transformers), each with the tokenizer it ships and a description for results files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import metadata
from pathlib import Path

import jax

from data_pipelines.errors import UserError
from data_pipelines.tokenizer import Tokenizer


@dataclasses.dataclass
class OpenModel:
    backend: object
    tokenizer: Tokenizer
    info: dict  # backend, path, sha256 of the weights, runtime versions

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()


def _file_sha256(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("shakti-jax", "jax", "jaxlib", "numpy", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def open_model(spec: str, *, max_len: int, batch_size: int = 32, flag: str = "--model") -> OpenModel:
    """The backend, tokenizer and description of a workdir, `gguf:PATH` or `hf:DIR`; the
    file and its tokenizer are checked before any weight loads."""
    kind, _, path = spec.partition(":")
    if kind in ("gguf", "hf") and not Path(path).exists():
        raise UserError(f"{flag} {spec}: {path} does not exist")
    if kind == "gguf":
        from shakti_jax.evaluation.backends import LlamaCppBackend
        from shakti_jax.imports.gguf_reader import read_gguf

        source = read_gguf(path)  # validates the file and reads its tokenizer
        info = {"backend": "llama.cpp", "path": path, "sha256": _file_sha256([path]),
                "versions": _versions("llama_cpp_python", "gguf")}
        return OpenModel(LlamaCppBackend(path, max_len=max_len), source.tokenizer, info)
    if kind == "hf":
        from shakti_jax.evaluation.backends import TransformersBackend
        from shakti_jax.imports.hf_reader import read_hf

        source = read_hf(path)
        weights = sorted(Path(path).glob("*.safetensors"))
        info = {"backend": "transformers", "path": path, "sha256": _file_sha256(weights),
                "versions": _versions("torch", "transformers")}
        return OpenModel(TransformersBackend(path, max_len=max_len), source.tokenizer, info)
    from shakti_jax.evaluation.backends import JaxBackend
    from shakti_jax.train.checkpoint import load_params, tree_checksums

    if not Path(spec).is_dir():
        raise UserError(f"{flag} {spec!r}: not a workdir (or use gguf:PATH / hf:DIR)")
    loaded = load_params(spec)
    if loaded.tokenizer_path is None:
        raise UserError(f"{flag} {spec}: its checkpoint names no tokenizer")
    checksums = json.dumps(tree_checksums(loaded.params), sort_keys=True).encode()
    info = {"backend": "jax", "path": spec, "step": loaded.step,
            "params_sha256": hashlib.sha256(checksums).hexdigest(), "versions": _versions("flax")}
    params = loaded.params
    if loaded.qat is not None:  # the model a QAT run trained: its GGUF blocks' values
        params = jax.jit(loaded.qat.apply)(params)
        info["qat"] = loaded.qat.qtype
    return OpenModel(JaxBackend(loaded.model_def, params, batch_size=batch_size, max_len=max_len),
                     Tokenizer.load(loaded.tokenizer_path), info)
