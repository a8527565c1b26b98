"""Chat rendering and its loss mask: this project's template, or the model's own (jinja).

A tokenizer without a `chat_template` (this project's sentencepiece models) renders as

    <s> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

with each text encoded on its own as plain text (so every turn gets sentencepiece's dummy
prefix, as `Tokenizer.encode(written_out, special=True)` and llama.cpp give the written-out
template). The loss covers the tokens of every assistant turn's text and its closing
`<|end|>` (so the model learns to stop), never the role tokens or any other turn.

A tokenizer with a `chat_template` (imported models) renders it with jinja as transformers'
`apply_chat_template` does, and the ids are what llama.cpp or transformers give the rendered
text, with one difference: only special-token strings the template itself writes become
control ids; message contents are always plain text. To tell them apart the template is
rendered a second time with a unique marker for each content; the markers cut that rendering
into template text and contents, and putting the real contents back must give the real
rendering (contents may be stripped by the template; any other change is refused). The text
between two template control tokens is encoded in one piece, as the runtimes encode it. The
loss covers each assistant content and the template text after it up to and including the
end-of-turn token (`tokenizer.eot_id`), never what follows it (ChatML's trailing newline).

Either way, data cannot fake or break the turn structure. Truncation keeps the final
assistant turn (the answer) whole and trims the tokens before it from the left (after a
leading BOS), counting what was trimmed; an answer that alone does not fit is a bad record.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from data_pipelines.bpe import render_template, template_variables
from data_pipelines.errors import DataError, TokenizerError
from data_pipelines.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
_ROLE_TOKEN = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"
_MARK = re.compile("\ue000([0-9]+)\ue001")


@dataclasses.dataclass(frozen=True)
class Rendered:
    ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # float32 [L], 1 where the token is a training target
    answer_start: int  # index where the final assistant turn (its role/template text) begins
    trimmed: int = 0  # prompt tokens cut from the left
    prefix: int = 1  # leading tokens truncation never cuts (a BOS)


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
    if tokenizer.chat_template is not None:
        return _render_template(tokenizer, messages, last_turn_only)
    chat = _own_tokens(tokenizer)
    ids, mask = [tokenizer.bos_id], [0.0]
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


def render_prompt(tokenizer: Tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    """Ids of a conversation ending in a user turn, followed by the assistant's generation
    prompt: what a model is given to answer it."""
    problem = check_messages([*messages, ("assistant", "x")])
    if problem is None and messages[-1][0] != "user":
        problem = "a prompt must end with a user turn"
    if problem is not None:
        raise DataError(f"cannot build a prompt: {problem}")
    if tokenizer.chat_template is None:
        chat = _own_tokens(tokenizer)
        ids = [tokenizer.bos_id]
        for role, content in messages:
            ids += [chat[_ROLE_TOKEN[role]], *tokenizer.encode(content), chat[END]]
        return ids + [chat["<|assistant|>"]]
    tokens = _template_tokens(tokenizer, messages, add_generation_prompt=True)
    return _with_bos(tokenizer, tokens.ids)[0]


def truncate(rendered: Rendered, max_len: int) -> Rendered | None:
    """Fit into `max_len` tokens by trimming the prompt from the left; None if impossible."""
    length = len(rendered.ids)
    if length <= max_len:
        return rendered
    answer, prefix = length - rendered.answer_start, rendered.prefix
    if prefix + answer > max_len:
        return None
    cut = length - max_len
    keep = np.r_[np.arange(prefix), np.arange(prefix + cut, length)]
    return Rendered(rendered.ids[keep], rendered.loss_mask[keep],
                    rendered.answer_start - cut, rendered.trimmed + cut, prefix)


def _own_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    chat = tokenizer.special_ids
    missing = [t for t in (*_ROLE_TOKEN.values(), END) if t not in chat]
    if missing:
        raise TokenizerError(f"the tokenizer has no chat template and lacks this project's chat "
                             f"tokens {' '.join(missing)}")
    return chat


# -- the model's own template ------------------------------------------------------------

def render_text(tokenizer: Tokenizer, messages: Sequence[tuple[str, str]], *,
                add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template rendered as text, as transformers' `apply_chat_template`."""
    return render_template(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           variables=template_variables(tokenizer))


@dataclasses.dataclass
class _Tokens:
    ids: list[int]
    starts: list[int]  # byte offset of each token in the rendered text
    special: list[bool]  # a control token the template wrote
    spans: dict[int, tuple[int, int]]  # message index -> byte span of its content
    text: str  # the rendered text

    def owner(self, i: int) -> int | None:
        """The message whose content token `i` starts in, or None (template text)."""
        return next((k for k, (a, b) in self.spans.items() if a <= self.starts[i] < b), None)


def _render_template(tokenizer: Tokenizer, messages: Sequence[tuple[str, str]],
                     last_turn_only: bool) -> Rendered:
    t = _template_tokens(tokenizer, messages, add_generation_prompt=False)
    final = len(messages) - 1
    owners = [t.owner(i) for i in range(len(t.ids))]
    if final not in owners:
        raise TokenizerError("the chat template does not write the final assistant turn's content")
    mask = np.zeros(len(t.ids), np.float32)
    for k, (role, _) in enumerate(messages):
        if role != "assistant" or (last_turn_only and k != final) or k not in owners:
            continue
        first, end = owners.index(k), len(owners) - owners[::-1].index(k) - 1
        for j in range(end + 1, len(owners)):
            if owners[j] is not None:
                break
            if t.special[j] and t.ids[j] == tokenizer.eot_id:
                end = j
                break
        mask[first:end + 1] = 1.0
    ids, prefix = _with_bos(tokenizer, t.ids)
    shift = len(ids) - len(t.ids)
    answer_start = min(_final_turn_start(tokenizer, messages, t, owners), owners.index(final))
    return Rendered(np.asarray(ids, np.int32), np.r_[np.zeros(shift, np.float32), mask],
                    answer_start + shift, prefix=prefix)


def _with_bos(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[int], int]:
    """`ids` with BOS in front when the tokenizer wants one and the template wrote none, and
    how many leading tokens (0 or 1) are that BOS."""
    if not tokenizer.add_bos:
        return ids, 0
    return (ids, 1) if ids[:1] == [tokenizer.bos_id] else ([tokenizer.bos_id, *ids], 1)


def _final_turn_start(tokenizer: Tokenizer, messages, t: _Tokens, owners: list) -> int:
    """Index where the final turn's template text begins: the end of the rendering without
    that turn when it is a prefix of the full one, else just after the previous content."""
    try:
        before = render_text(tokenizer, messages[:-1]) if len(messages) > 1 else ""
    except (TokenizerError, DataError):
        before = None
    if before is not None and t.text.startswith(before):
        cut = len(before.encode())
        return next(i for i, s in enumerate(t.starts) if s >= cut)
    earlier = [i for i, k in enumerate(owners) if k is not None and k < len(messages) - 1]
    return earlier[-1] + 1 if earlier else 0


def _template_tokens(tokenizer: Tokenizer, messages: Sequence[tuple[str, str]], *,
                     add_generation_prompt: bool) -> _Tokens:
    """The rendering's ids with contents encoded as plain text (see the module docstring)."""
    real = render_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    marked = render_text(tokenizer, [(role, f"\ue000{k}\ue001") for k, (role, _) in enumerate(messages)],
                         add_generation_prompt=add_generation_prompt)
    parts = _MARK.split(marked)
    texts, order = parts[0::2], [int(k) for k in parts[1::2]]
    if len(set(order)) < len(order):
        raise TokenizerError("the chat template writes a message's content more than once; "
                             "its contents cannot be told apart from its own text")
    for transform in (str, str.strip):  # templates that trim contents (Llama 3) render them stripped
        contents = [transform(messages[k][1]) for k in order]
        if "".join(a + b for a, b in zip(texts, [*contents, ""])) == real:
            break
    else:
        raise TokenizerError("the chat template changes message contents beyond stripping them; "
                             "its contents cannot be told apart from its own text")
    special = tokenizer.special_ids
    pattern = _special_pattern(tuple(special))
    lengths = tokenizer.byte_lengths()
    out = _Tokens([], [], [], {}, real)
    offset, run = 0, ""

    def flush() -> None:
        nonlocal offset, run
        start = offset
        for i in tokenizer.encode(run):
            out.ids.append(i)
            out.starts.append(offset)
            out.special.append(False)
            offset += int(lengths[i])
        if offset != start + len(run.encode()):
            raise TokenizerError("the tokenizer's token byte lengths do not add up to its text; "
                                 "chat templates need a byte-level tokenizer")
        run = ""

    for piece, (k, content) in zip(texts, [*zip(order, contents), (None, None)]):
        for j, part in enumerate(pattern.split(piece) if special else [piece]):
            if j % 2 == 0:
                run += part
                continue
            flush()
            out.ids.append(special[part])
            out.starts.append(offset)
            out.special.append(True)
            offset += len(part.encode())
        if k is not None:
            start = offset + len(run.encode())
            run += content
            out.spans[k] = (start, start + len(content.encode()))
    flush()
    return out


@functools.lru_cache(maxsize=16)
def _special_pattern(special: tuple[str, ...]) -> re.Pattern:
    """Special-token strings, longest first (a capturing group, so `split` keeps them)."""
    return re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")
