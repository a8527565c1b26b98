"""lm-evaluation-harness on our backends: any backend (JAX, llama.cpp, transformers) and its
Tokenizer as an lm-eval model, so lm-eval's own task YAMLs run on local data, offline.

    from shakti_jax.evaluation.lm_eval_adapter import evaluate
    evaluate(backend, tokenizer, ["my_task"], include_path=Path("tasks/"), limit=100)

or by name, once this module is imported: `lm_eval.simple_evaluate(model="shakti",
model_args="model=runs/smollm2,max_len=1024", ...)`, `model` as `evaluation.models.open_model`
reads it.

The requests lm-eval builds are token-identical to ours for the same strings:
- context + continuation: lm-eval's `TemplateLM._encode_pair` moves the context's trailing
  spaces to the continuation, encodes the whole and splits at the context's length, calling
  `tok_encode(text)` (add_special_tokens=None), which is `encode(text, add_bos=tokenizer.add_bos)`:
  exactly `tasks.encode_pair`;
- empty context: lm-eval encodes the continuation without special tokens and puts
  `prefix_token_id` (BOS, else EOS, as in `encode_pair`) before it. Its other branch (the
  continuation's first token as context when it equals the prefix) never runs: `encode` reads
  special-token text as plain characters, so it yields no BOS / EOS;
- rolling log-likelihood: the text encoded without BOS, in `rolling_requests` windows after the
  same prefix token, as `perplexity.perplexity_requests` builds them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from data_pipelines.tokenizer import Tokenizer
from shakti_jax.evaluation.requests import Request, rolling_requests

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task sets no max_gen_toks


@register_model("shakti")
class ShaktiLM(TemplateLM):
    """A backend (anything with `score(requests)` and `max_len`) and its tokenizer as an lm-eval
    model; rolling windows hold the backend's `max_len` tokens."""

    def __init__(self, backend, tokenizer: Tokenizer):
        super().__init__()
        self.model, self.tokenizer = backend, tokenizer  # not `self.backend`: TemplateLM's "causal" flag
        self.max_len = backend.max_len

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ShaktiLM:
        """`model=SPEC[,max_len=N][,batch_size=N]`: SPEC a workdir, `gguf:PATH` or `hf:DIR`."""
        from lm_eval.utils import simple_parse_args_string

        from shakti_jax.evaluation.models import open_model

        args = simple_parse_args_string(arg_string)
        batch_size = args.get("batch_size") or (additional_config or {}).get("batch_size") or 32
        opened = open_model(str(args["model"]), max_len=int(args.get("max_len", 1024)),
                            batch_size=int(batch_size))
        return cls(opened.backend, opened.tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """Our tokenizer; BOS as the tokenizer adds it to documents unless told False."""
        add_bos = self.tokenizer.add_bos and add_special_tokens is not False
        return self.tokenizer.encode(string, add_bos=add_bos)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scores = self.model.score([Request(tuple(context), tuple(continuation))
                                   for _, context, continuation in requests])
        for (strings, _, _), score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", strings, (score.logprob, score.greedy))
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows, all scored in one backend call."""
        texts = [request.args[0] for request in requests]
        windows = [list(rolling_requests(self.tokenizer.encode(text), self.prefix_token_id, self.max_len))
                   for text in texts]
        scores = iter(self.model.score([w for doc in windows for w in doc]))
        totals = [sum(next(scores).logprob for _ in doc) for doc in windows]
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation through the backend's `generate(prompt ids, max_new_tokens,
        stop_ids)` (stopping at the tokenizer's stop ids), each text cut before its first
        `until` string, as lm-eval's own models do."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise NotImplementedError(f"{type(self.model).__name__} only scores log-likelihoods: "
                                      "generate_until tasks need a backend with generate()")
        texts = []
        for context, gen_kwargs in (request.args for request in requests):
            stops = gen_kwargs.get("until") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            [ids] = generate([self.tok_encode(context)], max_new, self.tokenizer.stop_ids)
            text = self.tokenizer.decode(ids)
            for stop in stops:
                text = text.split(stop)[0] if stop else text
            texts.append(text)
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def evaluate(backend, tokenizer: Tokenizer, tasks: Sequence[str], include_path: Path | None = None,
             limit: int | None = None, *, builtin_tasks: bool = True) -> dict[str, dict]:
    """lm-eval's metrics per task (its `results["results"]`) for `backend`, offline: the Hub
    and datasets are set offline and HF_HOME, if unset, goes under the temp dir (before lm-eval
    first imports `datasets`, which reads them). `include_path`: a folder of task YAMLs;
    `builtin_tasks=False` skips indexing lm-eval's own ~13k YAMLs (about 10 s), which YAMLs in
    `include_path` can still `include:` by path."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HOME", str(Path(tempfile.gettempdir()) / "shakti-hf-home"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=builtin_tasks)
    results = lm_eval.simple_evaluate(model=ShaktiLM(backend, tokenizer), tasks=list(tasks), limit=limit,
                                      task_manager=manager)
    return results["results"]
