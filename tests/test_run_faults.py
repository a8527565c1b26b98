"""A hostile-but-fair user's reruns, typos and damaged files: nothing lost, nothing silently
wrong, one line each (issue: defects of the fault and bad-input probe)."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines.cli import run_main
from shakti_jax.config import ConfigError
from shakti_jax.train.checkpoint import CheckpointError, load_params, read_meta
from shakti_jax.train.metrics import read_metrics
from shakti_jax.train.trainer import Trainer, TrainingStopped
from shakti_jax.train.workdir import WorkdirBusy

from conftest import REPO_ROOT, tiny_experiment


def _config(tokenizer_path, **train):
    return tiny_experiment(tokenizer_path, seq_len=32, warmup_steps=1, **{
        **dict(batch_size=8, steps=4, log_every=2, eval_every=4, checkpoint_every=2,
               eval_batches=1), **train})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path):
    """A finished 4-step run (checkpoints 2 and 4) that tests copy before changing."""
    workdir = tmp_path_factory.mktemp("run")
    Trainer(_config(tokenizer_path), workdir).run()
    return workdir


def _copy(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _cli(module, *args, cwd=REPO_ROOT):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(result, *needles):
    lines = [l for l in result.stderr.splitlines() if l.strip() and "Warning" not in l
             and not l.startswith("  warnings.warn")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_conflicting_rerun_is_refused_and_loses_nothing(trained, tmp_path, tokenizer_path):
    workdir = _copy(trained, tmp_path / "run")
    rows = read_metrics(workdir)
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    config = _config(tokenizer_path)
    config.model.d_model = 128
    with pytest.raises(ConfigError, match=r"model.d_model=64 \(now 128\).*cannot change"):
        Trainer(config, workdir).run()
    config = _config(tokenizer_path, steps=6)
    config.optim.lr = 1e-3
    with pytest.raises(ConfigError, match=r"optim.lr=0.003 \(now 0.001\), train.steps=4 \(now 6\)"
                                          r".*allow_changes=optim.lr,train.steps"):
        Trainer(config, workdir).run()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
    assert read_metrics(workdir) == rows
    # the intended change, said explicitly: a longer schedule continues the run
    Trainer(_config(tokenizer_path, steps=6, allow_changes="train.steps"), workdir).run()
    assert [r["step"] for r in read_metrics(workdir)][-1] == 6
    assert read_metrics(workdir)[: len(rows)] == rows


def test_nan_learning_rate_is_a_config_error(tmp_path, tokenizer_path):
    config = _config(tokenizer_path)
    config.optim.lr = float("nan")
    with pytest.raises(ConfigError, match="optim.lr=nan"):
        Trainer(config, tmp_path)


def test_updates_to_nonfinite_params_stop_before_any_save(tmp_path, tokenizer_path):
    """Finite loss and gradients whose update overflows the weights: stopped, nothing saved."""
    config = _config(tokenizer_path, steps=4, log_every=1)
    config.optim.update(lr=1e38, clip_norm=0.0, warmup_steps=0, schedule="constant")
    with pytest.raises(TrainingStopped, match=r"not finite at step 1.*last good checkpoint: none"):
        Trainer(config, tmp_path).run()
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_second_run_on_a_workdir_is_refused(trained, tmp_path, tokenizer_path):
    workdir = _copy(trained, tmp_path / "run")
    (workdir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(WorkdirBusy, match=f"in use by pid {os.getpid()}"):
        Trainer(_config(tokenizer_path), workdir).run()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (workdir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    Trainer(_config(tokenizer_path), workdir).run()  # a stale lock is taken over
    assert not (workdir / ".lock").exists()


def test_os_errors_are_one_line(tmp_path, tokenizer_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    common = ["--config=experiments/pretrain.py:tiny", f"--config.data.tokenizer={tokenizer_path}",
              "--config.train.steps=40"]
    _one_error_line(_cli("shakti_jax.train", *common, f"--workdir={a_file}"), str(a_file))
    _one_error_line(_cli("shakti_jax.train", *common, f"--workdir={a_file}/run"), "a_file")


@pytest.mark.parametrize("error, message", [
    (PermissionError(errno.EACCES, "Permission denied", "/runs/ro/metrics.jsonl"),
     "error: Permission denied: /runs/ro/metrics.jsonl"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/full/checkpoints"),
     "error: No space left on device: /runs/full/checkpoints"),
])
def test_every_cli_turns_os_errors_into_one_line(capsys, error, message):
    """Read-only or full disks (root ignores permissions, so the errors are raised here):
    the wrapper every command runs under prints one line and exits 2."""

    def body():
        raise error

    with pytest.raises(SystemExit) as exit_:
        run_main(body)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_help_and_absl_flags_work():
    result = _cli("shakti_jax.train", "--help")  # absl exits 1 after printing help
    assert result.returncode in (0, 1) and "--workdir" in result.stdout, result.stderr
    assert "Unknown command line flag" not in result.stderr
    full = _cli("shakti_jax.train", "--helpfull")
    assert full.returncode in (0, 1) and "--jax_platforms" in full.stdout, full.stderr


def test_mistyped_config_key_is_one_clean_line(tmp_path):
    line = _one_error_line(_cli("shakti_jax.train", "--config=experiments/pretrain.py:tiny",
                                f"--workdir={tmp_path}", "--config.train.stpes=3"))
    assert "unknown config key" in line and "'stpes'" in line and 'did you mean "steps"' in line


def test_tokenizer_travels_with_the_workdir(trained, tmp_path, tokenizer_path):
    workdir = _copy(trained, tmp_path / "moved")
    assert read_meta(workdir)["tokenizer"] == "tokenizer.model"
    assert (workdir / "tokenizer.model").read_bytes() == open(tokenizer_path, "rb").read()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _cli("shakti_jax.generate", "--checkpoint", str(workdir), "--prompt", "The value",
                  "--max_new_tokens", "4", "--json", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"][0]) == 4


def _damage(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(b"garbage" * 20)


def test_readers_fall_back_from_a_damaged_newest_step(trained, tmp_path, capfd):
    workdir = _copy(trained, tmp_path / "run")
    _damage(workdir / "checkpoints" / "4")
    loaded = load_params(workdir)
    assert loaded.step == 2
    assert "skipped damaged checkpoint step 4" in capfd.readouterr().err
    with pytest.raises(CheckpointError, match="step 4"):
        load_params(workdir, 4)
    result = _cli("shakti_jax.generate", "--checkpoint", str(workdir), "--step", "4",
                  "--prompt_ids", "1,2", "--max_new_tokens", "2")
    _one_error_line(result, "step 4")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]  # untouched


def test_arrays_that_do_not_match_their_checksums_are_not_used(trained, tmp_path, tokenizer_path,
                                                                capfd):
    """A step whose arrays read back but differ from what was saved (here: its recorded
    checksum altered, as flipped bits in a stored chunk would) is never used."""
    workdir = _copy(trained, tmp_path / "run")
    meta_file = workdir / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    key = next(k for k in meta["checksums"] if k.startswith("['params']") and "w_up" in k)
    meta["checksums"][key] ^= 1
    meta_file.write_text(json.dumps(meta))
    assert load_params(workdir).step == 2
    assert "do not match their checksums" in capfd.readouterr().err
    Trainer(_config(tokenizer_path), workdir).run()  # the trainer sets step 4 aside, redoes it
    err = capfd.readouterr().err
    assert "checkpoint step 4 is unreadable" in err and "resuming from checkpoint step 2" in err


def test_odd_checkpoint_metadata_is_one_line(trained, tmp_path):
    workdir = _copy(trained, tmp_path / "run")
    for step in ("2", "4"):
        meta_file = workdir / "checkpoints" / step / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        meta["model"]["num_layers"] = "two"
        meta_file.write_text(json.dumps(meta))
    result = _cli("shakti_jax.generate", "--checkpoint", str(workdir), "--prompt_ids", "1,2")
    _one_error_line(result, "model.num_layers='two'")


def test_no_held_out_data_means_no_eval_metrics(tmp_path, tokenizer_path, capfd):
    config = _config(tokenizer_path)
    config.data.holdout_every = 0
    Trainer(config, tmp_path).run()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4]
    assert not [k for r in rows for k in r if k.startswith("eval_")]
    assert capfd.readouterr().err.count("no held-out data") == 1
    assert np.isfinite(rows[-1]["loss"])


def test_resume_from_a_chosen_step_keeps_the_newer_one(trained, tmp_path, tokenizer_path, capfd):
    workdir = _copy(trained, tmp_path / "run")
    rows = read_metrics(workdir)
    Trainer(_config(tokenizer_path, resume_step=2), workdir).run()
    err = capfd.readouterr().err
    assert "moved the newer step 4 to 4.after-resume-" in err and "resuming from checkpoint step 2" in err
    assert [p.name.split(".")[0] for p in (workdir / "checkpoints").iterdir()
            if ".after-resume-" in p.name] == ["4"]
    again = read_metrics(workdir)
    assert [r["step"] for r in again] == [r["step"] for r in rows]
    # same data and params from step 2 on; in-process reruns agree to float noise (the exact,
    # bit-identical resume is checked across processes in test_trainer and benchmarks/faults)
    np.testing.assert_allclose([r["loss"] for r in again[1:]], [r["loss"] for r in rows[1:]],
                               rtol=1e-5)


def test_skipped_records_are_counted_once_and_survive_a_resume(tmp_path, tokenizer_path):
    corpus = tmp_path / "docs.jsonl"
    good = [json.dumps({"text": f"record {i} of the corpus, with some words in it. " * 3})
            for i in range(60)]
    corpus.write_text("\n".join(good[:7] + ["{not json"] + good[7:]) + "\n")
    config = _config(tokenizer_path, steps=6, log_every=1, checkpoint_every=3,
                     allow_changes="train.steps")
    config.data.sources = (f"jsonl:{corpus}",)
    config.data.bad_records = "skip"
    config.data.holdout_every = 0
    Trainer(config, tmp_path).run()
    first = read_metrics(tmp_path)
    assert {r["skipped_records"] for r in first[2:]} == {1}, first
    config.train.steps = 9
    Trainer(config, tmp_path).run()
    assert read_metrics(tmp_path)[-1]["skipped_records"] == 1


def test_profile_steps_write_a_trace(tmp_path, tokenizer_path):
    Trainer(_config(tokenizer_path, steps=3, profile_steps=(1, 2)), tmp_path).run()
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_per_layer_checkpoints_from_before_stacking_still_load(tmp_path, tokenizer_path):
    """Checkpoints written with one `blocks[i]` entry per layer convert on load (generation,
    export, init_from); resuming such a workdir is refused with how to carry on."""
    import jax

    from shakti_jax.config import get_config
    from shakti_jax.model import ModelDef
    from shakti_jax.model.layout import layer_params
    from shakti_jax.train.checkpoint import save_params

    cfg = get_config("tiny")
    params = jax.tree.map(np.asarray, ModelDef.from_config(cfg).init(3))
    old = {k: v for k, v in params.items() if k != "groups"}
    old["blocks"] = {i: layer_params(params, cfg, i) for i in range(cfg.num_layers)}
    workdir = tmp_path / "old"
    save_params(workdir, cfg, old, step=7, tokenizer_path=tokenizer_path)
    meta_file = workdir / "checkpoints" / "7" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["checksums"]  # written before checksums existed, too
    meta_file.write_text(json.dumps(meta))
    loaded = load_params(workdir)
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(CheckpointError, match="per-layer params.*train.init_from="):
        Trainer(_config(tokenizer_path), workdir).run()


def test_a_restart_from_scratch_keeps_one_run_of_metrics(tmp_path, tokenizer_path):
    """Killed before its first checkpoint landed, a rerun starts over: the old rows go, so
    step 0 is not logged twice (found by benchmarks/faults.py)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 9.0}\n{"step": 1, "loss": 9.5}\n')
    Trainer(_config(tokenizer_path), tmp_path).run()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 2, 4]
    assert read_metrics(tmp_path)[0]["eval_loss"] != 9.0
