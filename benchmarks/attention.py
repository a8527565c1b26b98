"""Block-sparse / sliding-window attention speed on a GPU: the Pallas kernel vs cuDNN and XLA.

    python -m benchmarks.attention                 # the full table (needs a GPU)
    python -m benchmarks.attention --smoke         # tiny shapes, any backend (CPU: interpret mode)

bf16, head_dim 128, 16 query / 4 KV heads, batch = tokens_per_batch // seq_len (default 64k
tokens, enough to fill an H100), sequence 2k/8k/16k/32k, windows 256/1024/4096 and one
block-sparse layout. Columns: forward and forward+backward milliseconds (median of --repeats
after warm-up, compile excluded) for
  pallas        our kernel (`impl="pallas"`),
  cudnn_window  jax.nn.dot_product_attention(implementation="cudnn", local_window_size=(W-1, 0)),
  cudnn_causal  the same with a dense causal mask (what the window saves),
  xla           our XLA reference (skipped when its [B, N, T, S] logits exceed --xla_max_gb),
and the kernel's TFLOP/s counted over the tiles it computes (forward: 2 matmuls of
2 * block_q * block_k * head_dim per tile and head; forward+backward: 3.5x that, the usual
FlashAttention count), with the same process's measured bf16 matmul rate as the yardstick.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from shakti_jax.ops.attention import attention
from shakti_jax.ops.masks import BlockSparse, MaskSpec
from shakti_jax.ops.pallas_flash import default_blocks
from shakti_jax.ops.tiles import tile_plan

SPARSE = BlockSparse(block_size=128, local_blocks=2, global_blocks=1, random_blocks=2, seed=0)


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args) after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(size: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    seconds = timed(jax.jit(lambda a: a @ a), a, repeats=repeats)
    return 2 * size ** 3 / seconds / 1e12


def layouts(windows: list[int]) -> list[tuple[str, MaskSpec]]:
    return [*((f"window {w}", MaskSpec(window=w)) for w in windows),
            ("block-sparse 128: 2 local + 1 global + 2 random", MaskSpec(sparse=SPARSE))]


def cudnn_fn(window: int | None):
    def fn(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn",
            local_window_size=None if window is None else (window - 1, 0))
    return fn


def ours_fn(mask: MaskSpec, impl: str):
    return lambda q, k, v: attention(q, k, v, mask=mask, impl=impl)


def fwd_and_train_ms(fn, q, k, v, repeats: int) -> tuple[float, float]:
    forward = jax.jit(fn)
    train = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    try:
        return timed(forward, q, k, v, repeats=repeats) * 1e3, timed(train, q, k, v, repeats=repeats) * 1e3
    except Exception as err:  # a baseline that cannot run this shape (e.g. cuDNN limits): say why
        print(f"  skipped: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        return float("nan"), float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_lens", nargs="+", type=int, default=[2048, 8192, 16384, 32768])
    parser.add_argument("--windows", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--tokens_per_batch", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--xla_max_gb", type=float, default=16.0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script runs")
    args = parser.parse_args()
    heads, kv_heads, head_dim = 16, 4, 128
    baselines = jax.default_backend() == "gpu"
    if args.smoke:
        args.seq_lens, args.windows, args.tokens_per_batch, args.repeats = [256], [64], 256, 1
        heads, kv_heads, head_dim = 4, 2, 64
    elif not baselines:
        raise SystemExit("benchmarks.attention needs a GPU (use --smoke to check it runs here)")

    peak = matmul_tflops(256 if args.smoke else 8192, args.repeats)
    print(f"{platform.node()} | {jax.devices()[0].device_kind} | jax {jax.__version__} | "
          f"{datetime.date.today()} | bf16 matmul {peak:.1f} TFLOP/s")
    print(f"bf16, head_dim {head_dim}, {heads} query / {kv_heads} KV heads, "
          f"{args.tokens_per_batch} tokens per batch; times in ms (forward / forward+backward)\n")
    print("| seq | layout | pallas | TFLOP/s fwd / f+b (% of matmul) | cudnn window | cudnn causal | xla |")
    print("|---|---|---|---|---|---|---|")
    for seq in args.seq_lens:
        batch = max(1, args.tokens_per_batch // seq)
        keys = jax.random.split(jax.random.key(seq), 3)
        q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        causal = fwd_and_train_ms(cudnn_fn(None), q, k, v, args.repeats) if baselines else None
        for name, mask in layouts(args.windows):
            block_q, block_k = default_blocks(mask, head_dim)
            tiles = tile_plan(mask, seq, seq, block_q, block_k).computed_tiles
            flops = 4 * batch * heads * tiles * block_q * block_k * head_dim
            ours = fwd_and_train_ms(ours_fn(mask, "pallas"), q, k, v, args.repeats)
            tf_fwd, tf_train = flops / ours[0] / 1e9, 3.5 * flops / ours[1] / 1e9
            window = (fwd_and_train_ms(cudnn_fn(mask.window), q, k, v, args.repeats)
                      if baselines and mask.sparse is None else None)
            xla_gb = 4 * batch * heads * seq * seq / 2 ** 30
            xla = (fwd_and_train_ms(ours_fn(mask, "xla"), q, k, v, args.repeats)
                   if xla_gb <= args.xla_max_gb else None)

            def cell(pair):
                return "n/a" if pair is None else f"{pair[0]:.2f} / {pair[1]:.2f}"

            print(f"| {seq} | {name} | {cell(ours)} | {tf_fwd:.0f} / {tf_train:.0f} "
                  f"({100 * tf_train / peak:.0f}%) | {cell(window)} | {cell(causal)} | {cell(xla)} |",
                  flush=True)


if __name__ == "__main__":
    main()
