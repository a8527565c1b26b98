"""The chat template and its loss mask.

A conversation renders as

    <s> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

with each text encoded on its own as plain text (so every turn gets sentencepiece's dummy
prefix, as `Tokenizer.encode(written_out, special=True)` and llama.cpp give the written-out
template). Only this renderer puts control ids in a conversation: a "<|end|>" or "</s>"
written inside a text stays text, so data cannot fake or break the turn structure. The loss
covers the tokens of every assistant turn's text and its closing `<|end|>` (so the model
learns to stop), never the role tokens or any other turn.

Truncation keeps the final assistant turn (the answer) whole and trims the tokens before it
from the left (after `<s>`), counting what was trimmed; an answer that alone does not fit
is a bad record.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from data_pipelines.tokenizer import BOS_ID, Tokenizer

ROLES = ("system", "user", "assistant")
_ROLE_TOKEN = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"


@dataclasses.dataclass(frozen=True)
class Rendered:
    ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # float32 [L], 1 where the token is a training target
    answer_start: int  # index of the final assistant turn's role token
    trimmed: int = 0  # prompt tokens cut from the left


def check_messages(messages: Sequence[tuple[str, str]]) -> str | None:
    """Why a conversation cannot be used, or None."""
    if not messages:
        return "empty conversation"
    for role, content in messages:
        if role not in ROLES:
            return f"unknown role {role!r} (expected one of {ROLES})"
        if not isinstance(content, str):
            return f"{role} content is {type(content).__name__}, not text"
    if messages[-1][0] != "assistant":
        return "no assistant turn" if all(r != "assistant" for r, _ in messages) else \
            "conversation does not end with an assistant turn"
    if not messages[-1][1].strip():
        return "empty assistant completion"
    return None


def render(tokenizer: Tokenizer, messages: Sequence[tuple[str, str]], *,
           last_turn_only: bool = False) -> Rendered:
    """Token ids and loss mask of a checked conversation (see the module docstring).

    `last_turn_only` puts the loss on the final assistant turn alone (preference pairs,
    where earlier assistant turns are part of the prompt).
    """
    ids, mask = [BOS_ID], [0.0]
    chat = tokenizer.chat_token_ids
    answer_start = 0
    for turn, (role, content) in enumerate(messages):
        if role == "assistant":
            answer_start = len(ids)
        text = tokenizer.encode(content)
        ids += [chat[_ROLE_TOKEN[role]], *text, chat[END]]
        final = turn == len(messages) - 1
        weight = 1.0 if role == "assistant" and (final or not last_turn_only) else 0.0
        mask += [0.0] + [weight] * (len(text) + 1)
    return Rendered(np.asarray(ids, np.int32), np.asarray(mask, np.float32), answer_start)


def truncate(rendered: Rendered, max_len: int) -> Rendered | None:
    """Fit into `max_len` tokens by trimming the prompt from the left; None if impossible."""
    length = len(rendered.ids)
    if length <= max_len:
        return rendered
    answer = length - rendered.answer_start
    if 1 + answer > max_len:
        return None
    cut = length - max_len
    keep = np.r_[0, np.arange(1 + cut, length)]
    return Rendered(rendered.ids[keep], rendered.loss_mask[keep],
                    rendered.answer_start - cut, rendered.trimmed + cut)
