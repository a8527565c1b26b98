"""Print a model's parameter breakdown and costs: python -m shakti_jax.info --model NAME [--json]."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from data_pipelines.cli import ArgumentParser, fail
from shakti_jax.config import CONFIGS, NOMINAL_PARAMS, ConfigError, get_config
from shakti_jax.model_stats import summary


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def render(info: dict) -> str:
    lines = [f"{info['model']}: {info['layers']} layers ({', '.join(sorted(set(info['layer_kinds'])))})"]
    lines.append("parameters by part:")
    for part, n in info["parts"].items():
        lines.append(f"  {part:<10} {n:>13,}  ({100 * n / info['total_params']:.1f}%)")
    per_layer = info["per_layer"]
    lines.append(f"  per layer: attention {per_layer['attention']:,}, mlp {per_layer['mlp']:,}")
    lines.append(f"total {info['total_params']:,} ({_human(info['total_params'])}), "
                 f"non-embedding {info['non_embedding_params']:,}")
    nominal = NOMINAL_PARAMS.get(info["model"])
    if nominal:
        lines.append(f"vs nominal {_human(nominal)}: {100 * (info['total_params'] / nominal - 1):+.1f}%")
    lines.append(f"training FLOPs/token {_human(info['flops_per_token'])} "
                 f"(attention {_human(info['attention_flops_per_token'])}; visible keys/query "
                 f"{info['visible_keys_per_query']})")
    lines.append(f"KV cache (bf16): {info['kv_cache_bytes_per_token']:,} B/token in full; "
                 f"{_human(info['kv_cache_bytes_at_context'], 'B')} at full context with window rings")
    lines.append("weights: " + ", ".join(f"{k} {_human(v, 'B')}" for k, v in info["weight_bytes"].items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help=f"one of {sorted(CONFIGS)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        info = summary(get_config(args.model))
    except ConfigError as err:
        fail(str(err))
    print(json.dumps(info) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
