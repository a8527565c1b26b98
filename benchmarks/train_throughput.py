"""Training throughput: tokens/s, step time, MFU and peak memory of the real sharded step.

    python -m benchmarks.train_throughput [--models tiny shakti_100m] [--seq_len 512]
                                          [--batch 8] [--steps 5] [--dtype float32]
                                          [--tunings full lora qlora_q4_0 qat_q4_0]

Random tokens, the same jitted step (AdamW, donation, shardings over a mesh of every local
device, FSDP) that `python -m shakti_jax.train` runs. Timing excludes compilation and
counts steps only after a warm-up step. MFU uses the FLOPs of `shakti_jax.info` at this
sequence length against the device's peak (or, on CPUs, a matmul rate measured here).
Peak memory: the accelerator's allocator peak, or on CPU the compiled step's buffers and
the process's maximum resident set.

`--tunings` compares full fine-tuning with LoRA (rank 16, alpha 32, all seven projections)
over a dense frozen base and over a GGUF-quantized one (`qlora_<type>`, dequantized in the
step as in training): the same model, batch and step, one row each, with the frozen base's
bytes next to its bf16 size; `qat_<type>` is full fine-tuning under quantization-aware
training (every exported matrix fake-quantized in the step, `train.qat`).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import jax
import numpy as np

from experiments.pretrain import get_config as experiment
from shakti_jax.config import ModelConfig, get_config
from shakti_jax.lora import LoraConfig
from shakti_jax.model import ModelDef
from shakti_jax.model_stats import summary
from shakti_jax.qat import QAT
from shakti_jax.quant_base import nbytes
from shakti_jax.sharding import make_mesh
from shakti_jax.train.metrics import peak_flops_per_device
from shakti_jax.train.optimizer import make_optimizer
from shakti_jax.train.step import BuiltStep, build_step
from shakti_jax.train.tasks import Task
from shakti_jax.train.tuning import Tuning

LORA = LoraConfig(targets=("q", "k", "v", "o", "gate", "up", "down"), rank=16, alpha=32.0)


def tuning_named(name: str, cfg: ModelConfig) -> Tuning:
    """`full`, `lora` (dense frozen base), `qlora_<gguf type>` or `qat_<gguf type>` (full
    fine-tuning with fake-quantized weights)."""
    if name == "full":
        return Tuning()
    if name == "lora":
        return Tuning(LORA)
    if name.startswith("qat_"):
        return Tuning(qat=QAT.build(name.removeprefix("qat_"), cfg))
    return Tuning(LORA, name.removeprefix("qlora_"))


def lm_step(cfg: ModelConfig, batch: int, seq_len: int, micro_batches: int = 1,
            tuning: Tuning = Tuning()) -> BuiltStep:
    """The trainer's compiled LM step (AdamW, donation, FSDP over every local device); for
    LoRA the frozen base is a random init, quantized as `tuning` says."""
    config = experiment("tiny")
    config.data.seq_len = seq_len
    model_def, mesh = ModelDef.from_config(cfg), make_mesh(data=1, fsdp=-1)
    frozen = None
    if tuning.lora is not None:
        base = jax.jit(model_def.init, static_argnums=0, out_shardings=model_def.param_shardings(mesh))(0)
        frozen = tuning.frozen(model_def, base, mesh)
    return build_step(Task(config, None, None, cfg), model_def, make_optimizer(config.optim, 1000),
                      mesh, batch_size=batch, micro_batches=micro_batches, tuning=tuning,
                      frozen=frozen)


def random_batch(cfg: ModelConfig, rows: int, seq_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, size=(rows, seq_len + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((rows, seq_len), np.float32),
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))}


def measure_training(model: str, *, batch: int, seq_len: int, steps: int, dtype: str,
                     micro_batches: int = 1, tuning: str = "full", **overrides) -> dict:
    """Post-compile throughput of `steps` optimizer steps on random tokens."""
    cfg = get_config(model, dtype=dtype, dropout_rate=0.0, **overrides)
    built = lm_step(cfg, batch, seq_len, micro_batches, tuning_named(tuning, cfg))
    compiled, state = built.compiled, built.init()
    data = built.global_batch(random_batch(cfg, batch, seq_len))
    state, metrics = compiled(state, built.frozen, data)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, built.frozen, data)
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - start) / steps
    tokens_per_sec = batch * seq_len / step_time
    peak, peak_source = peak_flops_per_device(dtype)
    flops = summary(cfg, seq_len=seq_len)["flops_per_token"]
    stats = jax.devices()[0].memory_stats() or {}
    analysis = compiled.memory_analysis()
    step_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                  + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes) if analysis else 0
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(built.abstract_state.params))
    return {"model": model, "tuning": tuning, "params": summary(cfg)["total_params"],
            "trainable_params": trainable, "frozen": nbytes(built.frozen) if built.frozen else None,
            "batch": batch,
            "seq_len": seq_len, "step_time": step_time, "tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * flops / (peak * jax.device_count()), "peak_source": peak_source,
            "peak_device_bytes": stats.get("peak_bytes_in_use"), "step_buffer_bytes": step_bytes,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "shakti_100m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro_batches", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tunings", nargs="+", default=["full"],
                        help="full, lora, qlora_<type>, qat_<type> (type: q8_0 / q5_0 / q4_0 / q4_1)")
    args = parser.parse_args()
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {args.dtype}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"batch {args.batch} x seq {args.seq_len}, {args.steps} timed steps after 1 warm-up\n")
    print("| model | tuning | trainable | frozen base | tokens/s | step time | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for tuning in args.tunings:
            r = measure_training(model, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                                 dtype=args.dtype, micro_batches=args.micro_batches, tuning=tuning)
            memory = (f"{r['peak_device_bytes'] / 2**30:.2f} GiB device" if r["peak_device_bytes"]
                      else f"{r['step_buffer_bytes'] / 2**30:.2f} GiB step buffers, "
                           f"{r['max_rss_bytes'] / 2**30:.2f} GiB max RSS")
            mfu = f"{r['mfu']:.1%}" if "lora" not in tuning else "-"  # 6N FLOPs: full training only
            frozen = (f"{r['frozen'].total / 2**20:,.0f} MiB ({r['frozen'].ratio:.2f} x bf16)"
                      if r["frozen"] else "-")
            print(f"| {model} | {tuning} | {r['trainable_params'] / 1e6:.2f}M of "
                  f"{r['params'] / 1e6:.1f}M | {frozen} | {r['tokens_per_sec']:,.0f} | "
                  f"{r['step_time'] * 1e3:,.0f} ms | {mfu} | {memory} |", flush=True)
    print(f"\nMFU denominator: {r['peak_source']}")


if __name__ == "__main__":
    main()
