"""Build the tiny demo base model: a random-init Qwen2-architecture causal LM with a byte-level BPE
tokenizer trained here on the demo text, saved in the Hugging Face folder format so that every later stage
loads it with the real `from_pretrained(path)` code path.

Usage:

    from pathlib import Path
    from tunepath.demo import DemoConfig, build_demo_model
    build_demo_model(Path("models/demo"), DemoConfig(), sorted(Path("data/raw").glob("*")))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunepath.errors import StageError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from tunepath.demo import DemoConfig

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2

# Qwen2.5-Instruct's chat template without its default system prompt ("You are Qwen, ..."): plain ChatML for
# conversations without tools, Qwen's tool-calling format (<tools>, <tool_call>, <tool_response>) with them.
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Strings whose ids must survive the save/load round trip (the build checks them before returning).
PARITY_SAMPLES = [
    "Where is my order NW-123456? It's been 5 days.\n\nThanks!",
    "你好，我的订单什么时候能到？",
    "<|im_start|>user\nCan I return my boots?<|im_end|>\n<|im_start|>assistant\n",
]

MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags: [tunepath, demo]
---
# tunepath demo model (tiny, not for use)

A tiny Qwen2-architecture causal language model, built offline by `tunepath.demo.build_demo_model` so that
the tunepath pipeline can run end to end without downloading a model: random weights, then a short plain-text
pretraining on the demo documents and on support dialogues written as "Customer: ... Support: ..." text (not the
chats of the demo data). It knows the store's policies but not the chat template; SFT teaches it that. Its
purpose is to exercise the real loading, training, evaluation, merging and registration code paths.

- Architecture: Qwen2 (`Qwen2ForCausalLM`), {num_layers} layers, hidden size {hidden_size},
  {num_heads} attention heads / {num_kv_heads} key-value heads, MLP {intermediate_size}, tied embeddings,
  {parameters:,} parameters, float32.
- Tokenizer: byte-level BPE with {vocab} tokens, trained on the tunepath demo data (synthetic
  customer-service text for the fictional store Northwind Outfitters) with Qwen2's pre-tokenizer.
- Chat format: ChatML (`<|im_start|>role ... <|im_end|>`); generation stops at `<|im_end|>`.
- Seed: {seed}. The same seed and data give the same tokenizer and weights.
"""


def corpus_texts(path: Path) -> Iterator[str]:
    """Every piece of text in one demo input file: chat contents, documents, preference fields."""
    if path.suffix == ".txt":
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            if block.strip():
                yield block
        return
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: cannot read tokenizer training text from a {path.suffix!r} file; pass .jsonl or .txt files")
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the demo data contains broken rows on purpose
            yield from _strings(row)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        if isinstance(value.get("role"), str) and isinstance(value.get("content"), str):
            # Role names appear in every rendered chat, so the BPE should learn them too.
            yield f"{value['role']}\n{value['content']}"
            return
        for item in value.values():
            yield from _strings(item)


def train_tokenizer(corpus_files: list[Path], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with exactly the pipeline `Qwen2Tokenizer` rebuilds on load.

    transformers reconstructs a Qwen2 tokenizer from tokenizer.json's vocab and merges with its own
    normalizer and pre-tokenizer; any other pre-tokenizer here would silently change ids after loading.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown tokens
        show_progress=False,
    )
    texts = [text for path in corpus_files for text in corpus_texts(Path(path))]
    if not texts:
        raise ValueError(f"no text found in {[str(p) for p in corpus_files]}; generate the demo data first")
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _save_tokenizer(tokenizer: Tokenizer, out_dir: Path, cfg: DemoConfig):
    from transformers import Qwen2Tokenizer

    model = json.loads(tokenizer.to_str())["model"]
    hf_tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=cfg.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )
    hf_tokenizer.save_pretrained(out_dir)
    return hf_tokenizer


def _check_parity(tokenizer: Tokenizer, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(out_dir)
    for text in PARITY_SAMPLES:
        expected = tokenizer.encode(text).ids
        got = loaded(text, add_special_tokens=True)["input_ids"]
        if got != expected:
            raise StageError(
                f"tokenizer saved in {out_dir} loads as {type(loaded).__name__} with different ids for {text!r}: "
                f"{got} != {expected}; the training pipeline no longer matches the installed transformers"
            )


def build_demo_model(out_dir: Path, cfg: DemoConfig, corpus_files: list[Path]) -> Path:
    """Train the tokenizer on `corpus_files`, build a random-init Qwen2 model and save both in `out_dir`.

    Returns `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus_files, cfg.vocab_size)
    hf_tokenizer = _save_tokenizer(tokenizer, out_dir, cfg)
    _check_parity(tokenizer, out_dir)

    endoftext_id = tokenizer.token_to_id(ENDOFTEXT)
    im_end_id = tokenizer.token_to_id(IM_END)
    config = Qwen2Config(
        vocab_size=len(hf_tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=endoftext_id,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
    )
    # A private RNG stream: building the demo model must not reseed the caller's process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
        pretrained = None
        if cfg.pretrain_steps:
            from tunepath.demo.pretrain import pretrain_demo

            from tunepath.demo.data import pretraining_dialogues

            dialogues = pretraining_dialogues(cfg.pretrain_dialogues, cfg.seed)
            pretrained = pretrain_demo(model, tokenizer, corpus_files, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, seed=cfg.seed,
                                       extra_texts=dialogues)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext_id, eos_token_id=[im_end_id, endoftext_id], pad_token_id=endoftext_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    parameters = sum(p.numel() for p in model.parameters())
    card = MODEL_CARD.format(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        parameters=parameters,
        vocab=len(hf_tokenizer),
        seed=cfg.seed,
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8", newline="\n")
    log.info("demo model saved to %s: %d parameters, vocabulary %d", out_dir, parameters, len(hf_tokenizer))
    return out_dir
