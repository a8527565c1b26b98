"""Where layer i lives in the stacked params, and the per-layer layout of older checkpoints.

Params hold layers as `groups[g]["blocks"][slot]` with a leading axis of the group's repeats
(`ModelConfig.layer_groups`). The exporter reads one layer at a time (`layer_params`);
checkpoints written before stacking hold `blocks[i]` per layer (`stack_layers` converts).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from shakti_jax.config import ModelConfig


def layer_locations(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(group, repeat, slot) of every layer, in layer order."""
    where = []
    for g, (kinds, repeats) in enumerate(cfg.layer_groups):
        where.extend((g, r, s) for r in range(repeats) for s in range(len(kinds)))
    return where


def layer_params(params: dict, cfg: ModelConfig, layer: int) -> dict:
    """Layer `layer`'s params, unstacked (one slice per tensor; nothing else is read)."""
    g, r, s = layer_locations(cfg)[layer]
    return _map(lambda a: a[r], params["groups"][g]["blocks"][s])


def layer_tensor(params: dict, cfg: ModelConfig, layer: int, path: Sequence[str]) -> Any:
    """One tensor of layer `layer` (e.g. path ("attn", "wq")), sliced from its stack."""
    g, r, s = layer_locations(cfg)[layer]
    node = params["groups"][g]["blocks"][s]
    for key in path:
        node = node[key]
    return node[r]


def stack_layers(per_layer: Sequence[dict], cfg: ModelConfig) -> dict:
    """`{"groups": ...}` from per-layer param dicts (the pre-stacking checkpoint layout)."""
    where = layer_locations(cfg)
    groups = {}
    for g, (kinds, repeats) in enumerate(cfg.layer_groups):
        blocks = {}
        for s in range(len(kinds)):
            layers = [per_layer[i] for i, loc in enumerate(where) if loc[0] == g and loc[2] == s]
            blocks[s] = _map(lambda *a: np.stack(a), *layers)
        groups[g] = {"blocks": blocks}
    return {"groups": groups}


def is_per_layer(params: dict) -> bool:
    """Whether `params` use the per-layer `blocks` layout of checkpoints before stacking."""
    return "blocks" in params and "groups" not in params


def _map(fn, *trees: Any) -> Any:
    if isinstance(trees[0], dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)
