"""Real tokenizer files and chat templates of commonly fine-tuned models.

Each entry is a folder holding the model's files as found (SOURCES.md says where,
and which ones are verified against the official hashes); large files are stored
xz-compressed and restored by `materialize`, which gives a folder that
`AutoTokenizer.from_pretrained` loads offline when `has_tokenizer` is True.
"""

from __future__ import annotations

import lzma
import pathlib
import shutil
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent
SHARES = "SHARES_TOKENIZER_WITH"
# Files that hold the vocabulary; without one of them there is only a template.
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
DERIVE = "DERIVE_VOCAB_FROM"
_NOT_MODEL_FILES = {SHARES, DERIVE, "NOTE.md", "__init__.py"}
# What an entry may take from the one it shares a vocabulary with.
_SHAREABLE = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")

ENTRIES: list[str] = sorted(
    p.name for p in ROOT.iterdir() if p.is_dir() and (p / "tokenizer_config.json").is_file()
)


def _folder(name: str) -> pathlib.Path:
    if name not in ENTRIES:
        raise KeyError(f"no corpus entry {name!r}; entries: {', '.join(ENTRIES)}")
    return ROOT / name


def _shared_with(name: str) -> str | None:
    marker = _folder(name) / SHARES
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def _stored_names(folder: pathlib.Path) -> set[str]:
    return {p.name.removesuffix(".xz") for p in folder.iterdir() if p.is_file() and p.name not in _NOT_MODEL_FILES}


def has_tokenizer(name: str) -> bool:
    """True when the entry (or the entry it shares with) has its published vocabulary."""
    names = _stored_names(_folder(name))
    shared = _shared_with(name)
    if shared is not None:
        names |= _stored_names(_folder(shared))
    return any(v in names for v in _VOCAB_FILES)


def _restore(src: pathlib.Path, dest: pathlib.Path) -> None:
    target = dest / src.name.removesuffix(".xz")
    if src.suffix == ".xz":
        with lzma.open(src, "rb") as packed, target.open("wb") as out:
            shutil.copyfileobj(packed, out)
    else:
        shutil.copyfile(src, target)


def _model_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in _NOT_MODEL_FILES)


def materialize(name: str, dest: pathlib.Path) -> pathlib.Path:
    """Write the entry's files into dest (created if missing) and return dest.

    The entry's own files win; vocabulary files it lacks come from the entry
    named in its SHARES_TOKENIZER_WITH marker.
    """
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    own = _model_files(_folder(name))
    for src in own:
        _restore(src, dest)
    shared = _shared_with(name)
    if shared is not None:
        materialize(shared, dest / ".shared")
        have = {p.name.removesuffix(".xz") for p in own}
        for src in sorted((dest / ".shared").iterdir()):
            if src.name in _SHAREABLE and src.name not in have:
                shutil.copyfile(src, dest / src.name)
        shutil.rmtree(dest / ".shared")
    if not any((dest / f).is_file() for f in _VOCAB_FILES):
        _build_tokenizer_json(name, dest)
    return dest


# Text for the stand-in BPEs: chat-like English and Chinese, so merges exist for what the tests render.
_STAND_IN_TEXT = [
    "What is the capital of France? Paris. The weather in Paris is sunny, 21 degrees.",
    "You are a concise assistant. You help customers of a shop. Where is my order NW-123456?",
    "It has been shipped. It should arrive on Friday. Thanks! You are welcome. And plus 9? 17 * 3 = 51.",
    "可以退货吗？可以，30天内免费退货。北京是中国的首都。",
    "system user assistant model tool Today Date: 26 Jul 2024 Cutting Knowledge Date: December 2023",
] * 20


def _derived_from(name: str) -> str | None:
    marker = _folder(name) / DERIVE
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def stand_in(name: str) -> bool:
    """True when `materialize` builds the vocabulary (no real tokenizer.json stored for this entry)."""
    return not has_tokenizer(name)


STAND_IN = [name for name in ENTRIES if stand_in(name) and _derived_from(name) is None and _shared_with(name) is None]


def _added_tokens(config: dict) -> list[dict]:
    decoder = config.get("added_tokens_decoder") or {}
    return [{"id": int(i), **t} for i, t in sorted(decoder.items(), key=lambda kv: int(kv[0]))]


def _build_tokenizer_json(name: str, dest: pathlib.Path) -> None:
    import json

    config = json.loads((_folder(name) / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = _added_tokens(config)
    base = _derived_from(name)
    if base is not None:
        with tempfile.TemporaryDirectory() as tmp:
            data = json.loads((materialize(base, pathlib.Path(tmp)) / "tokenizer.json").read_text(encoding="utf-8"))
        data["added_tokens"] = added
    else:
        data = _small_bpe(added, sentencepiece=config.get("tokenizer_class", "").startswith("Gemma"))
    (dest / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _small_bpe(added: list[dict], sentencepiece: bool) -> dict:
    """A BPE over `_STAND_IN_TEXT` whose first ids are the added tokens, in their order, with their flags."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    contents = [t["content"] for t in added]
    if sentencepiece:
        bpe = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
        bpe.normalizer = normalizers.Replace(" ", "\u2581")
        bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        alphabet = []
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(contents) + 600, special_tokens=contents, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(_STAND_IN_TEXT, trainer=trainer)
    data = json.loads(bpe.to_str())
    if sentencepiece:  # byte-fallback pieces, as SentencePiece vocabularies have, for characters never seen
        vocab = data["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    flags = {t["content"]: t for t in added}
    data["added_tokens"] = [
        {**entry, **{k: flags[entry["content"]][k] for k in ("lstrip", "rstrip", "normalized", "single_word", "special") if k in flags[entry["content"]]}}
        for entry in data["added_tokens"]
    ]
    return data


def build_tiny_model(name: str, dest: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """The entry's tokenizer next to a tiny random Qwen2 model sized to its vocabulary: a real model folder
    (`from_pretrained` loads it) for end-to-end runs with a real tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    dest = materialize(name, dest)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(config).save_pretrained(str(dest))
    return dest
