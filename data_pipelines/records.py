"""Fine-tuning records: conversations (SFT) and preference pairs (DPO) from JSON / JSONL.

A spec is `KIND:PATH?format=NAME[&weight=W]`, KIND `jsonl` (optionally .gz) or `json` (one
object keyed by id, or a list). Formats:

  SFT        prompt_completion  {"prompt", "completion"}
             messages           {"messages": [{"role", "content"}, ...]}
             alpaca             {"instruction", "input"?, "output"} or
                                {"instruction", "instances": [{"input", "output"}, ...]}
             pubmedqa           {"QUESTION", "CONTEXTS": [...], "LONG_ANSWER"} (json, by id)
  DPO        hh                 {"chosen", "rejected"} transcripts ("\\n\\nHuman: ..."
                                "\\n\\nAssistant: ..."); the prompt is the shared prefix up
                                to the last Assistant turn
             pairs              {"prompt" (text or messages), "chosen", "rejected"}

Every example carries `where` ("file:line" or "file:id", and "file:line instance K" for each
of several Alpaca instances), unique within a file. A record that cannot be used comes
back with a `problem`; the pipeline raises or skips and counts it, by config.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.chat import check_messages
from data_pipelines.errors import DataError
from data_pipelines.sources import SourceSpec

SFT_FORMATS = ("prompt_completion", "messages", "alpaca", "pubmedqa")
DPO_FORMATS = ("hh", "pairs")
RECORD_KINDS = ("jsonl", "json")

Messages = list[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: Messages | None
    where: str
    problem: str = ""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: Messages | None  # every turn before the compared assistant reply
    chosen: str
    rejected: str
    where: str
    problem: str = ""


def read_records(spec: SourceSpec) -> Iterator[tuple[str, Any]]:
    """(where, parsed object or an Exception) for every record of a JSON / JSONL file."""
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    if spec.kind == "json":
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a valid JSON document ({err})") from None
        items = data.items() if isinstance(data, dict) else enumerate(data, start=1)
        for key, obj in items:
            yield f"{path}:{key}", obj
        return
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    yield f"{path}:{number}", json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    yield f"{path}:{number}", err


def load_conversations(spec_text: str) -> list[Conversation]:
    spec = _parse(spec_text, SFT_FORMATS)
    fmt = spec.options["format"]
    out = []
    for where, obj in read_records(spec):
        found = list(_conversations(obj, fmt))
        for k, (messages, problem) in enumerate(found, start=1):
            problem = problem or check_messages(messages)
            at = where if len(found) == 1 else f"{where} instance {k}"
            out.append(Conversation(None if problem else messages, at, problem or ""))
    return out


def load_pairs(spec_text: str) -> list[PreferencePair]:
    spec = _parse(spec_text, DPO_FORMATS)
    fmt = spec.options["format"]
    out = []
    for where, obj in read_records(spec):
        prompt, chosen, rejected, problem = _pair(obj, fmt)
        if not problem:
            problem = check_messages(prompt + [("assistant", chosen)]) or \
                      check_messages(prompt + [("assistant", rejected)])
        if not problem and chosen.strip() == rejected.strip():
            problem = "chosen and rejected are identical"
        out.append(PreferencePair(None if problem else prompt, chosen, rejected, where,
                                  problem or ""))
    return out


def _parse(spec_text: str, formats: tuple[str, ...]) -> SourceSpec:
    spec = SourceSpec.parse(spec_text, kinds=RECORD_KINDS)
    fmt = spec.options.get("format")
    if fmt not in formats:
        raise DataError(f"data source {spec_text!r}: needs ?format= one of {formats}")
    unknown = set(spec.options) - {"format"}
    if unknown:
        raise DataError(f"data source {spec_text!r}: unknown option(s) {sorted(unknown)}")
    return spec


def _field(obj: Any, key: str) -> tuple[Any, str]:
    if isinstance(obj, Exception):
        reason = obj.msg if isinstance(obj, json.JSONDecodeError) else "not valid UTF-8"
        return None, f"invalid JSON ({reason})"
    if not isinstance(obj, dict) or key not in obj:
        return None, f"missing field {key!r}"
    return obj[key], ""


def _conversations(obj: Any, fmt: str) -> Iterator[tuple[Messages, str]]:
    if fmt == "prompt_completion":
        prompt, p1 = _field(obj, "prompt")
        completion, p2 = _field(obj, "completion")
        yield [("user", prompt), ("assistant", completion)], p1 or p2
    elif fmt == "messages":
        turns, problem = _field(obj, "messages")
        if problem or not isinstance(turns, list):
            yield [], problem or "field 'messages' is not a list"
            return
        try:
            yield [(t["role"], t["content"]) for t in turns], ""
        except (TypeError, KeyError):
            yield [], "each message needs 'role' and 'content'"
    elif fmt == "alpaca":
        instruction, problem = _field(obj, "instruction")
        instances = obj.get("instances") if isinstance(obj, dict) else None
        if problem or not instances:
            output, p2 = _field(obj, "output")
            instances = [{"input": obj.get("input", "") if isinstance(obj, dict) else "",
                          "output": output}]
            problem = problem or p2
        for inst in instances:
            user = instruction if not inst.get("input") else f"{instruction}\n\n{inst['input']}"
            yield [("user", user), ("assistant", inst.get("output"))], problem
    else:  # pubmedqa
        question, p1 = _field(obj, "QUESTION")
        contexts, p2 = _field(obj, "CONTEXTS")
        answer, p3 = _field(obj, "LONG_ANSWER")
        problem = p1 or p2 or p3
        context = "\n".join(contexts) if isinstance(contexts, list) else ""
        yield [("user", f"{context}\n\nQuestion: {question}"), ("assistant", answer)], problem


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(transcript: str) -> Messages:
    """`\\n\\nHuman: a\\n\\nAssistant: b ...` -> [("user", "a"), ("assistant", "b"), ...]."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise ValueError("text before the first Human/Assistant turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [(roles[parts[i]], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def _pair(obj: Any, fmt: str) -> tuple[Messages, str, str, str]:
    chosen, p1 = _field(obj, "chosen")
    rejected, p2 = _field(obj, "rejected")
    if p1 or p2:
        return [], "", "", p1 or p2
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return [], "", "", "chosen and rejected must be text"
    if fmt == "pairs":
        prompt, problem = _field(obj, "prompt")
        if problem:
            return [], "", "", problem
        if isinstance(prompt, str):
            return [("user", prompt)], chosen, rejected, ""
        try:
            return [(t["role"], t["content"]) for t in prompt], chosen, rejected, ""
        except (TypeError, KeyError):
            return [], "", "", "prompt must be text or a list of {'role', 'content'}"
    try:
        chosen_turns, rejected_turns = parse_hh(chosen), parse_hh(rejected)
    except ValueError as err:
        return [], "", "", str(err)
    if not chosen_turns or chosen_turns[:-1] != rejected_turns[:-1]:
        return [], "", "", "chosen and rejected do not share the prompt up to the last turn"
    if chosen_turns[-1][0] != "assistant" or rejected_turns[-1][0] != "assistant":
        return [], "", "", "no assistant turn"
    return chosen_turns[:-1], chosen_turns[-1][1], rejected_turns[-1][1], ""
