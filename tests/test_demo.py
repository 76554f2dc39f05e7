"""The demo data generator and the tiny demo model: determinism, the data mix, and real HF loading paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tunepath.demo import DemoConfig, build_demo_model, generate_demo_data
from tunepath.demo.data import SIGN_OFF

SMALL = DemoConfig(conversations=120, documents=80, preference_pairs=60, vocab_size=1024, hidden_size=64, num_layers=2,
                   intermediate_size=256, pretrain_steps=20, pretrain_dialogues=100)
FILES = ("chat.jsonl", "corpus.txt", "preferences.jsonl")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _has_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    generate_demo_data(out, DemoConfig())
    return out


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory, demo_data) -> Path:
    out = tmp_path_factory.mktemp("model")
    return build_demo_model(out, SMALL, [demo_data / name for name in FILES])


def test_data_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path, demo_data):
    again = generate_demo_data(tmp_path / "a", DemoConfig())
    other = generate_demo_data(tmp_path / "b", DemoConfig(seed=1))
    assert again == other  # same counts ...
    for name in FILES:
        assert _digest(tmp_path / "a" / name) == _digest(demo_data / name)
        assert _digest(tmp_path / "b" / name) != _digest(demo_data / name)  # ... different content


def test_counts_match_the_files(tmp_path):
    counts = generate_demo_data(tmp_path, SMALL)
    chat_lines = (tmp_path / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    assert counts["chat.jsonl"] == len(chat_lines) == SMALL.conversations + counts["bad_rows"]
    documents = (tmp_path / "corpus.txt").read_text(encoding="utf-8").strip("\n").split("\n\n")
    assert counts["corpus.txt"] == len(documents) == SMALL.documents
    assert all(doc.strip() and "\n\n" not in doc for doc in documents)
    preferences = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text(encoding="utf-8").splitlines()]
    assert counts["preferences.jsonl"] == len(preferences) == SMALL.preference_pairs
    assert b"\r" not in (tmp_path / "chat.jsonl").read_bytes()


def test_chat_mix_and_bad_rows(demo_data):
    valid, broken = [], []
    for line in (demo_data / "chat.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            valid.append(json.loads(line)["messages"])
        except json.JSONDecodeError:
            broken.append(line)
    good = [m for m in valid if m[-1]["role"] == "assistant" and m[-1]["content"] and all(x["role"] in ("system", "user", "assistant") for x in m)]
    bad = [m for m in valid if m not in good]
    assert len(good) == 400
    n = len(good)
    assert 0.30 <= sum(m[0]["role"] == "system" for m in good) / n <= 0.50
    assert 0.20 <= sum(sum(x["role"] == "user" for x in m) >= 2 for m in good) / n <= 0.40
    assert 0.10 <= sum(_has_chinese(m[-2]["content"]) for m in good) / n <= 0.22
    assert all(x["content"].endswith(SIGN_OFF) for m in good for x in m if x["role"] == "assistant")
    assert all(sum(len(x["content"]) for x in m) <= 600 for m in good)
    # One of each deliberately broken kind, about 1-2 % of the lines.
    assert broken
    assert any(m[-1]["role"] == "assistant" and m[-1]["content"] == "" for m in bad)
    assert any(x["role"] == "bot" for m in bad for x in m)
    assert any(m[-1]["role"] == "user" for m in bad)
    assert 0.01 <= (len(broken) + len(bad)) / (len(valid) + len(broken)) <= 0.02


def test_preferences_prefer_the_on_style_answer(demo_data):
    rows = [json.loads(line) for line in (demo_data / "preferences.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
    assert all(row["chosen"].endswith(SIGN_OFF) and not row["rejected"].endswith(SIGN_OFF) for row in rows)
    assert all(len(row["chosen"]) > len(row["rejected"]) for row in rows)


def test_model_and_tokenizer_load_with_auto_classes(demo_model, demo_data):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer) <= SMALL.vocab_size
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]

    # The ids must not change between the trained tokenizer and the one transformers rebuilds.
    trained = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    for text in ["How long do refunds take? Order NW-555123.", "退货运费要我自己付吗？", "x <|im_start|>system\nhi<|im_end|>"]:
        assert tokenizer(text)["input_ids"] == trained.encode(text).ids
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer("<|im_start|>user")["input_ids"]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    chat = json.loads((demo_data / "chat.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    assert ids.shape[1] <= 256  # a typical demo chat fits the tiny model's training sequence
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_build_is_deterministic(tmp_path, demo_model, demo_data):
    files = [demo_data / name for name in FILES]
    same = build_demo_model(tmp_path / "same", SMALL, files)
    other = build_demo_model(tmp_path / "other", SMALL.model_copy(update={"seed": 1}), files)
    assert _digest(same / "model.safetensors") == _digest(demo_model / "model.safetensors")
    assert _digest(same / "tokenizer.json") == _digest(demo_model / "tokenizer.json")
    assert _digest(other / "model.safetensors") != _digest(demo_model / "model.safetensors")


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        DemoConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="extra"):
        DemoConfig(layers=2)


def test_pretraining_dialogues_are_plain_text_and_not_the_training_chats(demo_data):
    from tunepath.demo.data import pretraining_dialogues

    dialogues = pretraining_dialogues(2000, 0)
    assert dialogues == pretraining_dialogues(2000, 0) and dialogues != pretraining_dialogues(2000, 1)
    assert all(d.startswith("Customer: ") and "\nSupport: " in d and "<|im_start|>" not in d for d in dialogues)
    chats = set()
    for line in (demo_data / "chat.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            turns = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        except (ValueError, KeyError, TypeError):
            continue  # the deliberately broken rows
        chats.add("\n".join(("Customer: " if m["role"] == "user" else "Support: ") + m["content"] for m in turns))
    # other orders, dates and names: only chats built from templates without any slot recur verbatim (measured 29 of 391)
    assert len(chats & set(dialogues)) < 0.1 * len(chats)
