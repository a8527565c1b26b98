"""`shakti_jax.convert` under faults: OS errors, kills, damaged or diverged checkpoints, steps.

Every failure is one `error: ...` line with exit code 2 and leaves nothing behind; a kill
that cannot be caught leaves a temporary that the next conversion of the same target removes.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import atomic
from data_pipelines.default_corpus import write_default_corpus
from data_pipelines.tokenizer import train_tokenizer
from shakti_jax.config import TINY
from shakti_jax.convert import main
from shakti_jax.export import model_params
from shakti_jax.model import Transformer
from shakti_jax.train.checkpoint import save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runs a conversion that stalls at its first tensor, so a signal finds a temporary on disk.
STALLED_CONVERT = """
import sys, time
import gguf
from shakti_jax.export import hf_export

def stall(*args, **kwargs):
    time.sleep(120)

gguf.GGUFWriter.write_tensor_data = stall
hf_export.to_dtype = stall
from shakti_jax.convert import main
main(sys.argv[1:])
"""


def model(seed: int, nan_and_inf: bool = False) -> Transformer:
    m = Transformer(TINY, nnx.Rngs(seed))
    if nan_and_inf:
        state = nnx.state(m, nnx.Param)
        params = nnx.to_pure_dict(state)
        params["embedding"] = params["embedding"].at[3, 5].set(jnp.nan)
        params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.inf)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(m, state)
    return m


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`run` (steps 0 and 5, seeds 0 and 1), `other` (seed 2) and `nan` (NaN/Inf weights)."""
    root = tmp_path_factory.mktemp("runs")
    d = tmp_path_factory.mktemp("tok")
    tokenizer = train_tokenizer([write_default_corpus(d / "corpus.txt", 300_000)], 512, d / "tok")
    for name, step, m in [("run", 0, model(0)), ("step5", 5, model(1)), ("other", 0, model(2)),
                          ("nan", 0, model(0, nan_and_inf=True))]:
        save_model(root / name, m, step=step, tokenizer_path=tokenizer)
    shutil.copytree(root / "step5/checkpoints/5", root / "run/checkpoints/5")
    return root


def cli(capsys, *args: str | Path) -> tuple[int, str]:
    """(exit code, stderr) of `shakti_jax.convert.main(args)`."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args] + ["--no_progress"])
    return exit_info.value.code, capsys.readouterr().err


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ---- OS errors: one line, exit 2, nothing left ----

def test_out_under_a_regular_file(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = cli(capsys, "--checkpoint", runs / "run", "--format", "gguf", "--out", tmp_path / "file/m.gguf")
    assert code == 2 and f"{tmp_path / 'file'} is a file, not a folder" in one_error(err)
    assert everything(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(runs, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    code, err = cli(capsys, "--checkpoint", runs / "run", "--format", "hf", "--out", out / "hf")
    out.chmod(0o755)
    assert code == 2 and f"folder {out} is not writable" in one_error(err)
    assert everything(tmp_path) == ["ro"]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_mid_gguf_write(runs, tmp_path, capsys, monkeypatch):
    write = gguf.GGUFWriter.write_tensor_data
    calls = []

    def fills_up(self, tensor, *args):
        calls.append(1)
        return enospc() if len(calls) == 3 else write(self, tensor, *args)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fills_up)
    code, err = cli(capsys, "--checkpoint", runs / "run", "--format", "gguf", "--out", tmp_path / "new/dir/m.gguf")
    assert code == 2 and one_error(err) == "error: No space left on device"
    assert everything(tmp_path) == []  # not even the folders it created


def test_full_disk_at_hf_fsync(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "fsync", enospc)
    code, err = cli(capsys, "--checkpoint", runs / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert code == 2 and one_error(err) == "error: No space left on device"
    assert everything(tmp_path) == []


# ---- HF folders are replaced, not nested ----

def test_hf_reexport_replaces_the_folder(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(capsys, "--checkpoint", runs / "run", "--format", "hf", "--out", out)[0] == 0
    first = (out / "model.safetensors").read_bytes()
    listing = everything(tmp_path)
    assert cli(capsys, "--checkpoint", runs / "other", "--format", "hf", "--out", out)[0] == 0
    assert everything(tmp_path) == listing  # nothing nested, no temporaries
    assert (out / "model.safetensors").read_bytes() != first


def test_hf_refuses_to_replace_a_folder_that_is_not_an_export(runs, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = cli(capsys, "--checkpoint", runs / "run", "--format", "hf", "--out", tmp_path)
    assert code == 2 and "is not an HF export; refusing to replace it" in one_error(err)
    assert everything(tmp_path) == ["notes.txt"]


# ---- temporaries of killed conversions ----

def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, live = dead_pid(), os.getpid()
    stale = [f".m.gguf.tmp-{dead}-ab12", f".m.gguf.tmp-{dead}-ab12.f32", f".hf.tmp-{dead}-cd34",
             f".hf.old-{dead}-ef56"]
    kept = [f".m.gguf.tmp-{live}-0a0b", f".other.tmp-{dead}-aa", ".m.gguf.tmp-x", "m.gguf.tmp-1-ab"]
    for name in stale + kept:
        (tmp_path / name).write_text("partial")
    for name in (f".hf.tmp-{dead}-cd34", f".hf.old-{dead}-ef56", "hf"):
        (tmp_path / name).unlink(missing_ok=True)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    atomic.write_atomic(tmp_path / "m.gguf", b"new")
    with atomic.atomic_dir(tmp_path / "hf") as folder:
        (folder / "config.json").write_text("new")
    assert everything(tmp_path) == sorted(kept + ["hf", "hf/config.json", "m.gguf"])
    assert (tmp_path / "hf/config.json").read_text() == "new"


def test_a_folder_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    aside = tmp_path / f".hf.old-{dead_pid()}-77"
    aside.mkdir()
    (aside / "config.json").write_text("previous")
    atomic.remove_stale(tmp_path / "hf")
    assert everything(tmp_path) == ["hf", "hf/config.json"]


def start_stalled(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STALLED_CONVERT, *map(str, args), "--no_progress"],
                            cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)


def wait_for_temporary(child: subprocess.Popen, target: Path) -> None:
    prefix = f".{target.name}.tmp-{child.pid}-"
    deadline = time.monotonic() + 120
    while not (target.parent.is_dir() and any(p.name.startswith(prefix) for p in target.parent.iterdir())):
        assert child.poll() is None, child.communicate()[1]
        assert time.monotonic() < deadline, "no temporary appeared"
        time.sleep(0.05)


def test_sigkill_leaves_a_temporary_that_the_next_run_removes(runs, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    child = start_stalled("--checkpoint", runs / "run", "--format", "gguf", "--out", out)
    wait_for_temporary(child, out)
    child.kill()
    child.communicate()
    assert len(everything(tmp_path)) == 1 and everything(tmp_path)[0].startswith(".m.gguf.tmp-")
    assert cli(capsys, "--checkpoint", runs / "run", "--format", "gguf", "--out", out)[0] == 0
    assert everything(tmp_path) == ["m.gguf"]


def test_sigterm_removes_the_temporary_and_keeps_the_previous_export(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(capsys, "--checkpoint", runs / "run", "--format", "hf", "--out", out)[0] == 0
    listing, weights = everything(tmp_path), (out / "model.safetensors").read_bytes()
    child = start_stalled("--checkpoint", runs / "other", "--format", "hf", "--out", out)
    wait_for_temporary(child, out)
    child.terminate()
    _, err = child.communicate()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert everything(tmp_path) == listing
    assert (out / "model.safetensors").read_bytes() == weights


# ---- bad checkpoints and steps ----

def test_nan_weights_are_refused_before_writing(runs, tmp_path, capsys):
    code, err = cli(capsys, "--checkpoint", runs / "nan", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code == 2
    assert "token_embd.weight has 1 NaN/Inf values" in one_error(err)
    assert everything(tmp_path) == []


def embedding_of(path: Path) -> np.ndarray:
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    return np.asarray(tensors["token_embd.weight"].data)


def test_step_picks_the_checkpoint_and_a_missing_one_lists_the_steps(runs, tmp_path, capsys):
    code, err = cli(capsys, "--checkpoint", runs / "run", "--step", "3", "--format", "gguf", "--out", tmp_path)
    assert code == 2 and "no step 3; it has steps 0, 5" in one_error(err)
    assert everything(tmp_path) == []
    for step, seed in [("0", 0), (None, 1)]:
        out = tmp_path / f"step-{step}.gguf"
        assert cli(capsys, "--checkpoint", runs / "run", *(["--step", step] if step else []), "--format", "gguf",
                   "--quant", "f32", "--out", out)[0] == 0
        np.testing.assert_array_equal(embedding_of(out), np.asarray(model_params(model(seed))["embedding"]))


def test_damaged_newest_step_is_one_line_suggesting_step(runs, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(runs / "run", workdir)
    for f in (workdir / "checkpoints/5/state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"damaged")
    out = tmp_path / "out"
    code, err = cli(capsys, "--checkpoint", workdir, "--format", "gguf", "--out", out)
    assert code == 2
    error = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "checkpoint step 5 is damaged" in error[0], err
    assert error[0].endswith("export another step with --step (0)")
    assert not out.exists()
    assert cli(capsys, "--checkpoint", workdir, "--step", "0", "--format", "gguf", "--out", out)[0] == 0
