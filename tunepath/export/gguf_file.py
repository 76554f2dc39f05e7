"""A merged Hugging Face model folder as one GGUF file, the format llama.cpp and Ollama load.

Written with the `gguf` package (llama.cpp's own reader and writer), following the layout of llama.cpp's
`convert_hf_to_gguf.py` for the architectures tunepath trains most: Qwen2/2.5, Qwen3 and Llama/Mistral dense
decoders with a byte-level BPE tokenizer (Qwen, Llama-3, DeepSeek-R1-Distill). The chat template goes in as
`tokenizer.chat_template`, so runtimes render prompts as training did. Other architectures and SentencePiece
tokenizers get a one-line error that names the way out (llama.cpp's converter on the vLLM folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Hugging Face model_type -> (gguf architecture name, q/k rows reordered for llama.cpp's rotary layout)
ARCHITECTURES = {"qwen2": ("qwen2", False), "qwen3": ("qwen3", False), "llama": ("llama", True), "mistral": ("llama", True)}
# The pre-tokenizer llama.cpp must apply (it cannot read the regex from the file); chosen by the vocabulary family.
PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe", "mistral": "llama-bpe"}
DTYPES = ("f16", "bf16", "f32", "q8_0")


class ExportError(ValueError):
    """A model folder that cannot be exported as asked; the message says what to do instead."""


@dataclass
class GgufResult:
    path: Path
    architecture: str
    tensors: int
    dtype: str
    bytes: int


def write_gguf(model_dir: Path, out_path: Path, dtype: str = "f16") -> GgufResult:
    """Write `model_dir` (a merged model: config.json, safetensors, tokenizer.json) as `out_path`."""
    import gguf
    import numpy as np

    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config = _read_json(model_dir / "config.json")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"{model_dir}: GGUF export supports {', '.join(ARCHITECTURES)} models; this one is {model_type!r}. "
            "Export the vLLM folder (--format vllm) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    arch, permute_qk = ARCHITECTURES[model_type]
    tokenizer = _read_json(model_dir / "tokenizer.json")
    if (tokenizer.get("model") or {}).get("type") != "BPE" or not _byte_level(tokenizer):
        raise ExportError(
            f"{model_dir}: GGUF export writes byte-level BPE tokenizers (Qwen, Llama-3, DeepSeek-R1-Distill); this one is "
            "a SentencePiece-style tokenizer. Export the vLLM folder (--format vllm) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch)
    _add_hyperparameters(writer, config, model_dir.name, dtype)
    _add_tokenizer(writer, model_dir, tokenizer, config, PRE_TOKENIZERS[model_type])

    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    count = 0
    for name, array in _tensors(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads the output projection from token_embd when there is none
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"{model_dir}: tensor {name!r} has no GGUF name for architecture {arch}")
        if permute_qk and name.endswith("q_proj.weight"):
            array = _permute(array, heads, heads)
        elif permute_qk and name.endswith("k_proj.weight"):
            array = _permute(array, heads, kv_heads)
        writer.add_tensor(target, *_encoded(array, dtype, gguf, np))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufResult(out_path, arch, count, dtype, out_path.stat().st_size)


def _add_hyperparameters(writer, config: dict, name: str, dtype: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])


def _add_tokenizer(writer, model_dir: Path, tokenizer: dict, config: dict, pre: str) -> None:
    """Vocabulary by id (added tokens included, padded to the embedding rows), types, merges, special ids, template."""
    import gguf

    settings = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").exists() else {}
    vocab = dict(tokenizer["model"]["vocab"])
    kinds = {}
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    by_id = {i: t for t, i in vocab.items()}
    size = max(int(config.get("vocab_size") or 0), max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(kinds.get(i, gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"].get("merges", [])])
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id), ("pad_token", writer.add_pad_token_id)):
        text = _token_text(settings.get(key))
        if text in vocab:
            add(vocab[text])
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    template = _chat_template(model_dir, settings)
    if template:
        writer.add_chat_template(template)


def _chat_template(model_dir: Path, settings: dict) -> str | None:
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    return template if isinstance(template, str) else None


def _tensors(model_dir: Path):
    """(name, float32 numpy array) for every tensor of the folder's safetensors files, in file order."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no *.safetensors file; export a merged model (artifacts/merge/model)")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(torch.float32).numpy()


def _encoded(array, dtype: str, gguf, np):
    """The array as stored: 1-D tensors (norms, biases) stay f32 as llama.cpp keeps them."""
    if array.ndim == 1 or dtype == "f32":
        return (array.astype(np.float32),)
    if dtype == "f16":
        return (array.astype(np.float16),)
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if kind == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
        return (array.astype(np.float16),)  # Q8_0 blocks hold 32 values; llama.cpp falls back the same way
    return gguf.quants.quantize(array, kind), None, kind  # the writer derives the shape from the packed bytes


def _permute(weights, heads: int, kv_heads: int):
    """Rows of a q or k projection reordered from Hugging Face's rotate-half layout to llama.cpp's interleaved one."""
    n = kv_heads if kv_heads != heads else heads
    return weights.reshape(n, 2, weights.shape[0] // n // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _byte_level(tokenizer: dict) -> bool:
    def walk(node):
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tokenizer.get("pre_tokenizer")) or walk(tokenizer.get("decoder"))


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ExportError(f"{path}: missing; export needs a merged model folder (artifacts/merge/model or a registry reference)")
    return json.loads(path.read_text(encoding="utf-8"))
