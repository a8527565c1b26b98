"""Every fine-tuning dataset format of the paper's Table 1 (ShareGPT, UltraFeedback,
question/answer, Alpaca, Parquet, mapped fields, tfds), and weighted SFT / DPO mixtures."""

import collections
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.chat import render
from data_pipelines.default_corpus import write_default_corpus
from data_pipelines.errors import DataError
from data_pipelines.pipeline import dpo_batches, first_batches, records_dataset
from data_pipelines.records import load_conversations, load_pairs
from data_pipelines.tokenizer import BOS_ID, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_default_corpus(root / "corpus.txt", max_chars=300_000)
    return Tokenizer.load(train_tokenizer([corpus], 400, root / "tok"))


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _hand_rendered(tok, messages):
    """This project's template written out by hand: ids and the assistant-only loss mask."""
    chat = tok.chat_token_ids
    ids, mask = [BOS_ID], [0.0]
    for role, text in messages:
        body = tok.encode(text)
        ids += [chat[f"<|{role}|>"], *body, chat["<|end|>"]]
        mask += [0.0] + [1.0 if role == "assistant" else 0.0] * (len(body) + 1)
    return ids, mask


def _check_rendering(tok, messages):
    rendered = render(tok, messages)
    ids, mask = _hand_rendered(tok, messages)
    assert list(rendered.ids) == ids and list(rendered.loss_mask) == mask


def test_sharegpt_conversations_map_roles(tmp_path, tok):
    path = _jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Sum 2 and 3"},
                           {"from": "gpt", "value": "5"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "beep"}]},
        {"conversations": [{"speaker": "human", "text": "Hi"}]},
        {"id": 4}])
    convs = load_conversations(f"jsonl:{path}?format=sharegpt")
    expected = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
                ("user", "Sum 2 and 3"), ("assistant", "5")]
    assert convs[0].messages == expected and convs[0].where == f"{path}:1"
    _check_rendering(tok, convs[0].messages)
    assert [c.problem for c in convs[1:]] == [
        "unknown role 'robot' (expected one of ('system', 'user', 'assistant'))",
        "each message of 'conversations' needs 'role' and 'content' (or 'from' and 'value')",
        "missing field 'messages'"]
    assert [c.where for c in convs[1:]] == [f"{path}:{i}" for i in (2, 3, 4)]
    # `messages` reads the same records (both spellings are one format)
    assert load_conversations(f"jsonl:{path}?format=messages")[0].messages == expected


def test_question_answer_records_with_default_and_custom_templates(tmp_path, tok):
    path = _jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is the total?", "context": "Table: | a | 3 |", "answer": "3"},
        {"question": "Capital of France?", "answer": "Paris"},
        {"question": "No answer here"}])
    convs = load_conversations(f"jsonl:{path}?format=qa")
    assert convs[0].messages == [("user", "Table: | a | 3 |\n\nQuestion: What is the total?"),
                                 ("assistant", "3")]
    assert convs[1].messages == [("user", "Capital of France?"), ("assistant", "Paris")]
    assert convs[2].problem == "missing field 'answer'" and convs[2].where == f"{path}:3"
    _check_rendering(tok, convs[0].messages)
    custom = load_conversations(f"jsonl:{path}?format=qa&template=Q:%20{{question}}%0AC:%20{{context}}")
    assert custom[0].messages[0] == ("user", "Q: What is the total?\nC: Table: | a | 3 |")
    with pytest.raises(DataError, match=r"template= must use \{question\}.*\['answer'\]"):
        load_conversations(f"jsonl:{path}?format=qa&template={{answer}}")


def test_mapped_fields_need_no_code(tmp_path, tok):
    path = _jsonl(tmp_path / "cuad.jsonl", [{"q": "Governing law?", "a": "Oklahoma", "extra": 1}])
    convs = load_conversations(f"jsonl:{path}?format=prompt_completion&map=q:prompt,a:completion")
    assert convs[0].messages == [("user", "Governing law?"), ("assistant", "Oklahoma")]
    _check_rendering(tok, convs[0].messages)
    # without the map the record names its missing field; a bad map fails in one line
    assert load_conversations(f"jsonl:{path}?format=prompt_completion")[0].problem == "missing field 'prompt'"
    with pytest.raises(DataError, match=r"map= takes FROM:TO pairs .*got 'q'"):
        load_conversations(f"jsonl:{path}?format=prompt_completion&map=q")
    with pytest.raises(DataError, match=r"unknown option\(s\) \['colour'\]"):
        load_conversations(f"jsonl:{path}?format=prompt_completion&colour=red")


def test_alpaca_records(tmp_path, tok):
    path = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi", "output": "hi"}])
    convs = load_conversations(f"jsonl:{path}?format=alpaca")
    assert [c.messages for c in convs] == [[("user", "Translate\n\nbonjour"), ("assistant", "hello")],
                                           [("user", "Say hi"), ("assistant", "hi")]]
    _check_rendering(tok, convs[0].messages)


def test_parquet_sft_and_dpo_sources(tmp_path, tok):
    sft = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"messages": [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "c"}]]}), sft)
    convs = load_conversations(f"parquet:{sft}?format=messages")
    assert convs[0].messages == [("user", "a"), ("assistant", "b")]
    assert convs[1].where == f"{sft}:row 2" and convs[1].problem == "no assistant turn"
    _check_rendering(tok, convs[0].messages)
    folder = tmp_path / "pairs"
    folder.mkdir()
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "good": ["yes", "fine"], "bad": ["no", "fine"]}),
                   folder / "part-0.parquet")
    pairs = load_pairs(f"parquet:{folder}?format=pairs&map=question:prompt,good:chosen,bad:rejected")
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ([("user", "Q1")], "yes", "no")
    assert pairs[1].problem == "chosen and rejected are identical"
    with pytest.raises(DataError, match="is not a Parquet file"):
        load_conversations(f"parquet:{_jsonl(tmp_path / 'x.parquet', ['{}'])}?format=messages")


def test_ultrafeedback_pairs(tmp_path, tok):
    def side(reply):
        return [{"role": "user", "content": "Explain rain."}, {"role": "assistant", "content": reply}]

    path = _jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "Explain rain.", "chosen": side("Water vapour condenses."), "rejected": side("Gods cry."),
         "score_chosen": 8.5, "score_rejected": 3.0},
        {"prompt": "Explain rain.", "chosen": side("A"), "rejected": side("B"),
         "score_chosen": 5, "score_rejected": 5},
        {"chosen": side("A"), "rejected": [{"role": "user", "content": "Other?"},
                                           {"role": "assistant", "content": "B"}]},
        {"prompt": "Explain rain.", "chosen": side("A")}])
    pairs = load_pairs(f"jsonl:{path}?format=ultrafeedback")
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (
        [("user", "Explain rain.")], "Water vapour condenses.", "Gods cry.")
    assert [p.problem for p in pairs[1:]] == [
        "score_chosen 5 is not above score_rejected 5",
        "chosen and rejected do not share the turns before the reply",
        "missing field 'rejected'"]
    # the chosen row scores exactly the reply and its end token, after the shared prompt
    batch = next(iter(dpo_batches([("uf", pairs[:1])], tok, batch_size=1, seq_len=48, seed=None)))
    for row, reply in enumerate(("Water vapour condenses.", "Gods cry.")):
        scored = batch["targets"][row][batch["loss_mask"][row] > 0]
        assert list(scored) == [*tok.encode(reply), tok.chat_token_ids["<|end|>"]]
    # message-list pairs without a prompt field: the shared turns are the prompt
    plain = _jsonl(tmp_path / "lists.jsonl", [{"chosen": side("A"), "rejected": side("B")}])
    assert load_pairs(f"jsonl:{plain}?format=pairs")[0].problem == "missing field 'prompt'"
    assert load_pairs(f"jsonl:{plain}?format=ultrafeedback")[0].prompt == [("user", "Explain rain.")]


def test_tfds_records_are_read_with_their_locations(tmp_path):
    from data_pipelines.tfds_corpus import prepare_corpus

    _jsonl(tmp_path / "a.jsonl", [{"text": "first document"}, {"text": "second document"}])
    prepare_corpus("fmt", [f"jsonl:{tmp_path / 'a.jsonl'}"], str(tmp_path / "tfds"))
    convs = load_conversations(f"tfds:shakti_corpus/fmt?data_dir={tmp_path / 'tfds'}"
                               f"&format=prompt_completion&map=text:prompt")
    assert len(convs) == 2 and all(c.problem == "missing field 'completion'" for c in convs)
    assert convs[0].where == "tfds shakti_corpus/fmt[train]:record 1"


def _source(tmp_path, name, n):
    path = _jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name} {i}", "completion": "x"} for i in range(n)])
    return (name, load_conversations(f"jsonl:{path}?format=prompt_completion"))


def test_weighted_mixture_samples_sources_in_ratio(tmp_path):
    sources = [_source(tmp_path, "finance", 40), _source(tmp_path, "legal", 300)]
    ds, _ = records_dataset(sources, holdout_every=10, part="train", seed=3, weights=[3.0, 1.0])
    names = collections.Counter(ds[i].where.rsplit("/", 1)[1].split(".")[0] for i in range(1000))
    assert names["finance"] + names["legal"] == 1000
    assert abs(names["finance"] / 1000 - 0.75) <= 0.02, names  # exact 3:1 interleaving, +-2%
    # held-out records never reach training, per source
    held = {c.where for _, convs in sources for c in convs[9::10]}
    assert not held & {ds[i].where for i in range(1000)}
    with pytest.raises(Exception, match="one positive number per source"):
        records_dataset(sources, 10, "train", 0, weights=[1.0])


def test_dpo_mixture_indexes_every_source(tmp_path, tok):
    def pairs(name, n):
        path = _jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name} {i}", "chosen": "good", "rejected": "bad"}
                                                   for i in range(n)])
        return (name, load_pairs(f"jsonl:{path}?format=pairs"))

    sources = [pairs("finance", 8), pairs("legal", 24)]
    ds = dpo_batches(sources, tok, batch_size=4, seq_len=24, seed=0, weights=[1.0, 3.0])
    seen = np.concatenate([b["index"] for b in first_batches(ds, 50)])
    assert abs(np.mean(seen >= 8) - 0.75) <= 0.05  # legal pairs carry index 8..31
    held = dpo_batches([sources[1]], tok, batch_size=1, seq_len=24, seed=None, part="eval",
                       holdout_every=4, first_index=8, drop_remainder=False)
    assert [int(b["index"][0]) for b in held] == [8 + 3, 8 + 7, 8 + 11, 8 + 15, 8 + 19, 8 + 23]


@pytest.mark.parametrize("domain, usable", [("healthcare", [1000]), ("finance", [2461]),
                                            ("legal", [4247]), ("mixed", [1000, 2461, 4247])])
def test_domain_recipes_read_the_shared_sets(shared_data, monkeypatch, domain, usable):
    from conftest import REPO_ROOT
    from experiments.domain import get_config
    from shakti_jax.train.tasks.base import source_names

    monkeypatch.chdir(REPO_ROOT)  # the recipes name ../shared/data from the repo root
    config = get_config(f"smollm2,{domain}")
    sources = [load_conversations(spec) for spec in config.data.sources]
    assert [sum(c.messages is not None for c in convs) for convs in sources] == usable
    assert config.data.holdout_every == 10 and len(set(source_names(config.data.sources))) == len(usable)
    if domain != "healthcare":  # question/answer records: FINANCE_LEGAL.md's prompt view
        file = "tatqa_finance.jsonl" if domain == "finance" else "cuad_legal.jsonl"
        row = json.loads((shared_data / "domain" / file).read_text().splitlines()[0])
        assert sources[-1][0].messages == [("user", f"{row['context']}\n\nQuestion: {row['question']}"),
                                           ("assistant", row["answer"])]
    assert get_config(f"shakti_250m,{domain},dpo").stage == "dpo"
    qlora = get_config(f"smollm2,{domain},qlora")
    assert (qlora.lora.base_quant, qlora.lora.rank, len(qlora.lora.targets)) == ("q4_0", 16, 7)
    assert qlora.optim.lr == pytest.approx(10 * config.optim.lr) and not config.lora.targets
    dpo_lora = get_config(f"shakti_250m,{domain},dpo,lora")
    assert (dpo_lora.lora.base_quant, dpo_lora.dpo.reference) == ("", "precomputed")
    for bad in ("shakti_250m,space", "smollm2,legal,lora,dpo"):
        with pytest.raises(ValueError, match="expected SIZE,DOMAIN"):
            get_config(bad)
