"""Fine-tuning records: conversations (SFT) and preference pairs (DPO) from JSON / JSONL /
Parquet files or tfds datasets.

A spec is `KIND:PATH?format=NAME[&map=FROM:TO,...][&template=T][&weight=W]`, KIND `jsonl`
(optionally .gz), `json` (one object keyed by id, or a list), `parquet` (a file or a folder
of *.parquet), `tfds` (a registered name; `split=`, `data_dir=`) or `tfds_dir` (a prepared
dataset folder). `map` renames fields before the format reads them, so a new dataset needs no
code (`?format=prompt_completion&map=question:prompt,answer:completion`). Formats:

  SFT        prompt_completion  {"prompt", "completion"}
             messages           {"messages": [{"role", "content"}, ...]}; also ShareGPT:
             (alias sharegpt)   {"conversations": [{"from", "value"}, ...]}, roles mapped
                                (human -> user, gpt / chatgpt / bing / bard -> assistant)
             alpaca             {"instruction", "input"?, "output"} or
                                {"instruction", "instances": [{"input", "output"}, ...]}
             qa                 {"question", "answer", "context"?} rendered by `template`
                                (default: "{context}\n\nQuestion: {question}", or just the
                                question without a context)
             pubmedqa           {"QUESTION", "CONTEXTS": [...], "LONG_ANSWER"} (json, by id)
  DPO        hh                 {"chosen", "rejected"} transcripts ("\n\nHuman: ..."
                                "\n\nAssistant: ..."); the prompt is the shared prefix up
                                to the last Assistant turn
             pairs              {"prompt" (text or messages), "chosen", "rejected"}; chosen
                                and rejected are text or message lists ending in the reply
             ultrafeedback      {"prompt"?, "chosen": [messages], "rejected": [messages],
                                "score_chosen"?, "score_rejected"?}: the shared turns before
                                the last assistant reply are the prompt; a pair whose chosen
                                score is not above the rejected one is a bad record

  RL         prompts            {"prompt" (text or messages), ...}: the other fields reach the
                                reward functions (e.g. "answer" for `arithmetic`); the DPO
                                formats give their pairs' prompts

Every example carries `where` ("file:line", "file:id" or "file:row N", and "... instance K"
for each of several Alpaca instances), unique within a file. A record that cannot be used
comes back with a `problem`; the pipeline raises or skips and counts it, by config.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import string
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.chat import check_messages
from data_pipelines.errors import DataError
from data_pipelines.sources import SourceSpec

SFT_FORMATS = ("prompt_completion", "messages", "sharegpt", "alpaca", "qa", "pubmedqa")
DPO_FORMATS = ("hh", "pairs", "ultrafeedback")
PROMPT_FORMATS = ("prompts",) + DPO_FORMATS
RECORD_KINDS = ("jsonl", "json", "parquet", "tfds", "tfds_dir")
QA_TEMPLATE = "{context}\n\nQuestion: {question}"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "assistant": "assistant",
                  "system": "system"}

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
    """(where, parsed object or an Exception) for every record of a spec's files or dataset."""
    if spec.kind in ("tfds", "tfds_dir"):
        yield from _tfds_records(spec)
        return
    path = Path(spec.path)
    if spec.kind == "parquet":
        yield from _parquet_records(path)
        return
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


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise DataError(f"data {'folder' if path.is_dir() else 'file'} {path} "
                        f"{'has no *.parquet files' if path.is_dir() else 'does not exist'}")
    for file in files:
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{file} is not a Parquet file ({' '.join(str(err).split())[:200]})") from None
        for row, obj in enumerate(table.to_pylist(), start=1):
            yield f"{file}:row {row}", obj


def _tfds_records(spec: SourceSpec) -> Iterator[tuple[str, dict]]:
    from data_pipelines.sources import TfdsSource

    split = spec.options.get("split", "train")
    source = TfdsSource(spec.path, "", split=split, data_dir=spec.options.get("data_dir"),
                        from_dir=spec.kind == "tfds_dir")._source
    for index in range(len(source)):
        yield f"tfds {spec.path}[{split}]:record {index + 1}", _plain(source[index])


def _plain(value: Any) -> Any:
    """tfds values (bytes, numpy arrays, nested dicts) as JSON-like Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_conversations(spec_text: str) -> list[Conversation]:
    spec = _parse(spec_text, SFT_FORMATS)
    fmt, template = spec.options["format"], spec.options.get("template", QA_TEMPLATE)
    out = []
    for where, obj in _mapped(read_records(spec), spec):
        found = list(_conversations(obj, fmt, template))
        for k, (messages, problem) in enumerate(found, start=1):
            problem = problem or check_messages(messages)
            at = where if len(found) == 1 else f"{where} instance {k}"
            out.append(Conversation(None if problem else messages, at, problem or ""))
    return out


def load_pairs(spec_text: str) -> list[PreferencePair]:
    spec = _parse(spec_text, DPO_FORMATS)
    fmt = spec.options["format"]
    out = []
    for where, obj in _mapped(read_records(spec), spec):
        prompt, chosen, rejected, problem = _pair(obj, fmt)
        if not problem:
            problem = check_messages(prompt + [("assistant", chosen)]) or \
                      check_messages(prompt + [("assistant", rejected)])
        if not problem and chosen.strip() == rejected.strip():
            problem = "chosen and rejected are identical"
        out.append(PreferencePair(None if problem else prompt, chosen, rejected, where,
                                  problem or ""))
    return out


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    messages: Messages | None  # the turns the policy continues with an assistant reply
    fields: dict  # the record's other fields, for reward functions
    where: str
    problem: str = ""


def load_prompts(spec_text: str) -> list[PromptRecord]:
    """RL prompts: `format=prompts` records, or the prompts of a DPO format's pairs."""
    spec = _parse(spec_text, PROMPT_FORMATS)
    if spec.options["format"] != "prompts":
        return [PromptRecord(p.prompt, {"chosen": p.chosen, "rejected": p.rejected}, p.where, p.problem)
                for p in load_pairs(spec_text)]
    out = []
    for where, obj in _mapped(read_records(spec), spec):
        if not isinstance(obj, dict):
            out.append(PromptRecord(None, {}, where, "a prompts record must be a JSON object"))
            continue
        prompt, problem = _prompt_of(obj, required=True)
        if not problem:
            problem = check_messages([*prompt, ("assistant", "x")]) or \
                ("" if prompt[-1][0] == "user" else "a prompt must end with a user turn")
        fields = {k: v for k, v in obj.items() if k != "prompt"}
        out.append(PromptRecord(None if problem else prompt, fields, where, problem or ""))
    return out


def _parse(spec_text: str, formats: tuple[str, ...]) -> SourceSpec:
    spec = SourceSpec.parse(spec_text, kinds=RECORD_KINDS)
    fmt = spec.options.get("format")
    if fmt not in formats:
        raise DataError(f"data source {spec_text!r}: needs ?format= one of {formats}")
    allowed = {"format", "map"} | ({"template"} if fmt == "qa" else set()) | \
        ({"split", "data_dir"} if spec.kind in ("tfds", "tfds_dir") else set())
    unknown = set(spec.options) - allowed
    if unknown:
        raise DataError(f"data source {spec_text!r}: unknown option(s) {sorted(unknown)}")
    _field_map(spec_text, spec.options.get("map", ""))
    if "template" in spec.options:
        fields = {name for _, name, _, _ in string.Formatter().parse(spec.options["template"]) if name}
        if not fields or fields - {"question", "context"}:
            raise DataError(f"data source {spec_text!r}: template= must use {{question}} and may "
                            f"use {{context}} (got {sorted(fields) or 'no fields'})")
    return spec


def _field_map(spec_text: str, text: str) -> dict[str, str]:
    """`map=a:b,c:d` -> {"a": "b", "c": "d"} (rename field a to b)."""
    mapping = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        source, sep, target = item.partition(":")
        if not sep or not source or not target:
            raise DataError(f"data source {spec_text!r}: map= takes FROM:TO pairs separated by "
                            f"commas (got {item!r})")
        mapping[source] = target
    return mapping


def _mapped(records: Iterator[tuple[str, Any]], spec: SourceSpec) -> Iterator[tuple[str, Any]]:
    mapping = _field_map("", spec.options.get("map", ""))
    for where, obj in records:
        if mapping and isinstance(obj, dict):
            obj = {mapping.get(k, k): v for k, v in obj.items()}
        yield where, obj


def _field(obj: Any, key: str) -> tuple[Any, str]:
    if isinstance(obj, Exception):
        reason = obj.msg if isinstance(obj, json.JSONDecodeError) else "not valid UTF-8"
        return None, f"invalid JSON ({reason})"
    if not isinstance(obj, dict) or key not in obj:
        return None, f"missing field {key!r}"
    return obj[key], ""


def _turns(turns: Any, name: str) -> tuple[Messages, str]:
    """A list of {role, content} or ShareGPT {from, value} messages, roles mapped."""
    if not isinstance(turns, list):
        return [], f"field {name!r} is not a list of messages"
    out = []
    for turn in turns:
        if isinstance(turn, dict) and "role" in turn and "content" in turn:
            out.append((turn["role"], turn["content"]))
        elif isinstance(turn, dict) and "from" in turn and "value" in turn:
            role = turn["from"]
            out.append((SHAREGPT_ROLES.get(role.lower(), role) if isinstance(role, str) else role,
                        turn["value"]))
        else:
            return [], f"each message of {name!r} needs 'role' and 'content' (or 'from' and 'value')"
    return out, ""


def _conversations(obj: Any, fmt: str, template: str) -> Iterator[tuple[Messages, str]]:
    if fmt == "prompt_completion":
        prompt, p1 = _field(obj, "prompt")
        completion, p2 = _field(obj, "completion")
        yield [("user", prompt), ("assistant", completion)], p1 or p2
    elif fmt in ("messages", "sharegpt"):
        name = "conversations" if isinstance(obj, dict) and "conversations" in obj and \
            "messages" not in obj else "messages"
        turns, problem = _field(obj, name)
        yield _turns(turns, name) if not problem else ([], problem)
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
    elif fmt == "qa":
        question, p1 = _field(obj, "question")
        answer, p2 = _field(obj, "answer")
        context = obj.get("context") if isinstance(obj, dict) else None
        if p1 or p2:
            yield [], p1 or p2
        elif not isinstance(question, str) or not (context is None or isinstance(context, str)):
            yield [], "question and context must be text"
        else:
            used = template if context or "{context}" not in template else "{question}"
            yield [("user", used.format(question=question, context=context or "")),
                   ("assistant", answer)], ""
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


def _split_reply(prompt: Messages, chosen: Messages, rejected: Messages) -> tuple[Messages, str, str, str]:
    """Two message lists ending in the compared replies -> (shared prompt, chosen, rejected).
    The lists may repeat `prompt` at their start (UltraFeedback does) or hold the prompt."""
    for side in (chosen, rejected):
        if not side or side[-1][0] != "assistant":
            return [], "", "", "chosen and rejected must end with an assistant reply"
    before_c, before_r = chosen[:-1], rejected[:-1]
    if before_c != before_r:
        return [], "", "", "chosen and rejected do not share the turns before the reply"
    if prompt and before_c[:len(prompt)] == prompt:
        before_c = before_c[len(prompt):]
    return prompt + before_c, chosen[-1][1], rejected[-1][1], ""


def _prompt_of(obj: dict, required: bool) -> tuple[Messages, str]:
    if "prompt" not in obj:
        return [], "missing field 'prompt'" if required else ""
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        return [("user", prompt)], ""
    turns, problem = _turns(prompt, "prompt")
    return turns, problem and "prompt must be text or a list of {'role', 'content'}"


def _pair(obj: Any, fmt: str) -> tuple[Messages, str, str, str]:
    chosen, p1 = _field(obj, "chosen")
    rejected, p2 = _field(obj, "rejected")
    if p1 or p2:
        return [], "", "", p1 or p2
    if fmt == "hh":
        return _hh_pair(chosen, rejected)
    prompt, problem = _prompt_of(obj, required=fmt == "pairs")
    if problem:
        return [], "", "", problem
    if fmt == "ultrafeedback":
        scores = obj.get("score_chosen"), obj.get("score_rejected")
        if None not in scores and not (isinstance(scores[0], (int, float)) and
                                       isinstance(scores[1], (int, float)) and scores[0] > scores[1]):
            return [], "", "", f"score_chosen {scores[0]!r} is not above score_rejected {scores[1]!r}"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not prompt:
            return [], "", "", "missing field 'prompt'"
        return prompt, chosen, rejected, ""
    if isinstance(chosen, list) and isinstance(rejected, list):
        (c, pc), (r, pr) = _turns(chosen, "chosen"), _turns(rejected, "rejected")
        if pc or pr:
            return [], "", "", pc or pr
        return _split_reply(prompt, c, r)
    return [], "", "", "chosen and rejected must both be text or both message lists"


def _hh_pair(chosen: Any, rejected: Any) -> tuple[Messages, str, str, str]:
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return [], "", "", "chosen and rejected must be text"
    try:
        chosen_turns, rejected_turns = parse_hh(chosen), parse_hh(rejected)
    except ValueError as err:
        return [], "", "", str(err)
    if not chosen_turns or chosen_turns[:-1] != rejected_turns[:-1]:
        return [], "", "", "chosen and rejected do not share the prompt up to the last turn"
    if chosen_turns[-1][0] != "assistant" or rejected_turns[-1][0] != "assistant":
        return [], "", "", "no assistant turn"
    return chosen_turns[:-1], chosen_turns[-1][1], rejected_turns[-1][1], ""
