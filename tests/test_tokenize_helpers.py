"""Fixtures for the tokenize tests: small tokenizers (and a tiny model) built in a few seconds, offline.

- `chatml_model`: a byte-level BPE trained with Qwen2's pre-tokenizer, saved through `Qwen2Tokenizer` next to a
  tiny random `Qwen2ForCausalLM`, with the ChatML template: what the demo model looks like, at test size.
- `llama_tokenizer`: a tokenizer with `<s>`/`</s>` specials and no chat template (for the llama2 built-in).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CORPUS = [
    "Hello world, how are you? I am fine, thank you.",
    "The capital of France is Paris. The capital of China is Beijing.",
    "你好，世界！北京是中国的首都。我想退货，请问怎么办？",
    "system user assistant Be concise. You are a helpful assistant.",
    "Where is my order NW-123456? It has been 5 days.\n\nThanks!",
] * 10

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello world, how are you?"}],
    [
        {"role": "system", "content": "Be concise."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where is my order NW-123456?"},
        {"role": "assistant", "content": "It has been shipped.\n\nThanks!"},
        {"role": "user", "content": "How many days?"},
        {"role": "assistant", "content": "5 days."},
        {"role": "user", "content": "Thank you."},
        {"role": "assistant", "content": "I am fine, thank you."},
    ],
    [
        {"role": "user", "content": "你好，我想退货。"},
        {"role": "assistant", "content": "你好！请问订单号是什么？"},
        {"role": "user", "content": "NW-123456"},
        {"role": "assistant", "content": "北京是中国的首都。"},
    ],
    [
        {"role": "user", "content": "  spaces around  "},
        {"role": "assistant", "content": "  answer with spaces and a trailing newline\n"},
    ],
]


def _train_bpe(specials: list[str], vocab_size: int = 500):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def build_chatml_model(out_dir: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    bpe = json.loads(_train_bpe(CHATML_SPECIALS).to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]],
        unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def build_llama_tokenizer(out_dir: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(["<unk>", "<s>", "</s>"]), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def chatml_model(tmp_path_factory) -> Path:
    return build_chatml_model(tmp_path_factory.mktemp("chatml-model"))


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory) -> Path:
    return build_llama_tokenizer(tmp_path_factory.mktemp("llama-tokenizer"))


def write_records(folder: Path, records: list[dict]) -> Path:
    """A validate-stage folder holding its records shard (ids made up, kind and split as given)."""
    (folder / "records").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"{i:016x}", "source": {"file": "t.jsonl", "line": i + 1}, **r}, ensure_ascii=False) for i, r in enumerate(records)]
    (folder / "records" / "records-00000.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def learnt_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive learnt tokens."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in spans]
