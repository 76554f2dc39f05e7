"""`tunepath chat`'s fast path: a model folder answered with torch, `tokenizers` and jinja, without transformers.

Importing transformers' model and generation code costs about 3.3 CPU s, against 0.3 s for all else chat does
on the demo model but importing torch (it imports `torch.distributed.tensor`, `torch._dynamo` and sympy at module level, and so does the one
architecture module `transformers.models.qwen2.modeling_qwen2`). For the decoder family most fine-tunes use
(Llama, Qwen2, Qwen3, Mistral: RMSNorm, rotary positions, grouped-query attention, SwiGLU) the forward pass is a
few dozen lines over the same torch ops, so a folder that transformers 5 saved (the merged model) is read
directly: `config.json`, the safetensors, `tokenizer.json` with `tokenizer_config.json`, the chat template.

Rotary embeddings: the default, linear scaling and Llama 3.1-3.3's `llama3` frequencies. Greedy decoding only,
on the CPU: the answer is the one `ChatModel` (transformers' `generate`) gives, token for
token (tests/test_chat_lite.py compares both). `unsupported` names what the fast path cannot do for a folder,
and `tunepath chat` then takes the full path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

from tunepath.serve.prompt import PromptEncoder, PromptError

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# generation_config.json keys that cannot change a greedy answer with explicit max_new_tokens and stop ids (the
# sampling ones, what generate returns besides the tokens); any other (repetition_penalty, suppress_tokens,
# min_new_tokens, num_beams, ...) may: full path.
IGNORED_GENERATION_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version", "_from_model_config",
                           "do_sample", "temperature", "top_p", "top_k", "max_length", "use_cache", "output_attentions",
                           "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate"}
ROPE_TYPES = ("default", "linear", "llama3")  # llama3: Llama 3.1-3.3's long-context frequencies
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def unsupported(folder: Path, temperature: float = 0.0) -> str | None:
    """Why the fast path cannot answer for `folder` as the full path would, or None when it can."""
    folder = Path(folder)
    if temperature > 0:
        return "sampling (--temperature > 0) uses transformers' generation"
    config, tok = _read(folder / "config.json"), _read(folder / "tokenizer_config.json")
    if config.get("auto_map") or tok.get("auto_map"):
        return "the model or tokenizer has remote code (auto_map)"
    family = config.get("model_type")
    if family not in FAMILIES:
        return f"model_type {family!r} is not one of {', '.join(FAMILIES)}"
    if config.get("architectures") not in (None, [f"{_class_stem(family)}ForCausalLM"]):
        return f"architectures {config.get('architectures')} is not the {family} causal LM"
    # a key config.json leaves out takes the family's default in transformers (Qwen2's 32 key/value heads,
    # Qwen3's head_dim 128), which the shapes alone would not tell
    needed = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps"]
    missing = [k for k in needed + ["head_dim"] * (family == "qwen3") if k not in config]
    if missing:
        return f"config.json leaves {', '.join(missing)} to the family's default"
    if config.get("quantization_config"):
        return "the weights are quantized"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act {config.get('hidden_act')!r} (only silu)"
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES or rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        return f"rope_type {rope.get('rope_type')!r} (only {', '.join(ROPE_TYPES)} rotary embeddings)"
    if any(t != "full_attention" for t in config.get("layer_types") or []) or config.get("use_sliding_window"):
        return "sliding-window attention"
    if family == "mistral" and config.get("sliding_window") is not None:
        return "sliding-window attention"
    if not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists():
        return "no model.safetensors"
    if not (folder / "tokenizer.json").exists():
        return "no tokenizer.json"
    if tok.get("backend") != "tokenizers":
        # transformers 5 rebuilds a tokenizer's pipeline from its class; tokenizer.json holds that pipeline only
        # once transformers 5 saved it (the tokenize and merge stages do), which writes `backend`
        return "the tokenizer was not saved by transformers 5 (tokenizer_config.json has no backend: tokenizers)"
    if tok.get("clean_up_tokenization_spaces"):
        return "the tokenizer cleans up spaces when decoding"
    if not isinstance(_template(folder, tok), str):
        return "no single chat template"
    extra = sorted(set(_read(folder / "generation_config.json")) - IGNORED_GENERATION_KEYS)
    if extra:
        return f"generation_config.json sets {', '.join(extra)}"
    import torch

    if torch.cuda.is_available():
        return "a GPU is available (the fast path is for the CPU)"
    return None


def _class_stem(family: str) -> str:
    return {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama", "mistral": "Mistral"}[family]


def _rope(config: dict) -> dict:
    """Rotary settings as transformers 5 writes them (`rope_parameters`), or as 4.x did (`rope_theta`, `rope_scaling`)."""
    if config.get("rope_parameters"):
        return config["rope_parameters"]
    scaling = dict(config.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"  # 4.x wrote either key
    return {**scaling, "rope_type": kind, "rope_theta": config.get("rope_theta", 10000.0)}


def _template(folder: Path, tok: dict):
    """The chat template transformers would load: chat_template.jinja first, then tokenizer_config's."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return tok.get("chat_template")


class LiteTokenizer:
    """What `PromptEncoder` and decoding read of a transformers tokenizer, from the saved files alone."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        config = _read(folder / "tokenizer_config.json")
        self.backend_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.chat_template = _template(folder, config)
        named = {name: config.get(name) for name in NAMED_TOKENS}
        named.update(config.get("model_specific_special_tokens") or {})  # Gemma 3's image tokens, as transformers 5 saves them
        named = {k: v["content"] if isinstance(v, dict) else v for k, v in named.items()}
        self.special_tokens_map = {k: str(v) for k, v in named.items() if v is not None}
        self.added_tokens_decoder = self.backend_tokenizer.get_added_tokens_decoder()
        self.eos_token_id = self._id(named["eos_token"])
        self.pad_token_id = self._id(named["pad_token"])

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class Decoder:
    """The Llama-family decoder's forward pass over a state dict, with a key/value cache per layer."""

    def __init__(self, config: dict, weights: dict) -> None:
        import torch

        self.w = weights
        self.layers = config["num_hidden_layers"]
        self.heads, self.kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        self.dtype = weights["model.embed_tokens.weight"].dtype
        # tied (transformers' default for these families is untied): the embedding is the head, whatever the file holds
        tied = config.get("tie_word_embeddings", False)
        if not tied and "lm_head.weight" not in weights:
            raise ValueError("the weights hold no lm_head.weight and config.json does not tie it to the embedding")
        self.lm_head = weights["model.embed_tokens.weight"] if tied else weights["lm_head.weight"]
        q, k = weights["model.layers.0.self_attn.q_proj.weight"].shape[0], weights["model.layers.0.self_attn.k_proj.weight"].shape[0]
        if (q, k) != (self.heads * self.head_dim, self.kv_heads * self.head_dim):
            raise ValueError(f"the attention weights ({q}, {k} rows) do not fit config.json's heads and head_dim")
        self.inv_freq = inverse_frequencies(_rope(config), self.head_dim)
        self.cache: list[tuple] = []

    def _norm(self, x, weight):
        import torch

        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    def _linear(self, x, name: str):
        import torch.nn.functional as F

        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _rotary(self, positions):
        import torch

        freqs = (self.inv_freq[None, :, None] @ positions[None, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    @staticmethod
    def _rotate(x, cos, sin):
        import torch

        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def forward(self, ids: list[int]):
        """Logits of the last position after feeding `ids` (the prompt, then one token at a time)."""
        import torch
        import torch.nn.functional as F

        start = self.cache[0][0].shape[2] if self.cache else 0
        positions = torch.arange(start, start + len(ids))
        cos, sin = self._rotary(positions)
        h = F.embedding(torch.tensor([ids]), self.w["model.embed_tokens.weight"])
        for k in range(self.layers):
            p = f"model.layers.{k}."
            x = self._norm(h, self.w[p + "input_layernorm.weight"])
            shape = (1, len(ids), -1, self.head_dim)
            q = self._linear(x, p + "self_attn.q_proj").view(shape).transpose(1, 2)
            key = self._linear(x, p + "self_attn.k_proj").view(shape).transpose(1, 2)
            value = self._linear(x, p + "self_attn.v_proj").view(shape).transpose(1, 2)
            if p + "self_attn.q_norm.weight" in self.w:  # Qwen3 normalises each head before the rotation
                q = self._norm(q, self.w[p + "self_attn.q_norm.weight"])
                key = self._norm(key, self.w[p + "self_attn.k_norm.weight"])
            q, key = self._rotate(q, cos, sin), self._rotate(key, cos, sin)
            if len(self.cache) > k:
                key = torch.cat((self.cache[k][0], key), dim=2)
                value = torch.cat((self.cache[k][1], value), dim=2)
                self.cache[k] = (key, value)
            else:
                self.cache.append((key, value))
            groups = self.heads // self.kv_heads
            attn = F.scaled_dot_product_attention(q, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1),
                                                  is_causal=len(ids) > 1, scale=self.head_dim ** -0.5)
            attn = attn.transpose(1, 2).reshape(1, len(ids), -1)
            h = h + self._linear(attn, p + "self_attn.o_proj")
            x = self._norm(h, self.w[p + "post_attention_layernorm.weight"])
            gate = F.silu(self._linear(x, p + "mlp.gate_proj")) * self._linear(x, p + "mlp.up_proj")
            h = h + self._linear(gate, p + "mlp.down_proj")
        h = self._norm(h[:, -1:], self.w["model.norm.weight"])
        return F.linear(h, self.lm_head)[0, -1]


def inverse_frequencies(rope: dict, dim: int):
    """The rotary embedding's inverse frequencies, computed as transformers 5.17's `modeling_rope_utils` does."""
    import math

    import torch

    base = rope.get("rope_theta", 10000.0)
    # int64 arange made float, then divided: the float32 rounding of transformers
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind != "llama3":
        return inv_freq
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def load_weights(folder: Path, dtype: str | None) -> dict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(_read(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    if dtype:
        import torch

        target = getattr(torch, DTYPES.get(dtype, dtype))
        weights = {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}
    return weights


class LiteChat:
    """The part of `ChatModel` that `tunepath chat` uses (`prompts`, `stream`, `generate`), greedy, on the CPU."""

    def __init__(self, folder: Path, name: str = "", template_kwargs: dict | None = None, render_date: str | None = None,
                 max_new_tokens: int = 256) -> None:
        import datetime as dt

        folder = Path(folder)
        self.name = name or folder.name
        config = _read(folder / "config.json")
        self.tokenizer = LiteTokenizer(folder)
        # transformers' dtype="auto": the config's dtype, else the stored one
        self.weights = load_weights(folder, config.get("dtype") or config.get("torch_dtype"))
        self.config = config
        Decoder(config, self.weights)  # the weights' names and shapes fit the config, or ValueError/KeyError now
        date = dt.date.fromisoformat(render_date) if render_date else None
        self.prompts = PromptEncoder(self.tokenizer, self.tokenizer.chat_template, template_kwargs, date)
        generation = _read(folder / "generation_config.json")
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        stops = eos if isinstance(eos, list) else [eos]
        self.stop_ids = [i for i in dict.fromkeys([*stops, self.tokenizer.eos_token_id]) if i is not None]
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def tokens(self, ids: list[int], request: dict, stop=None) -> Iterator[int]:
        """The answer's token ids as they are chosen (argmax), up to and including a stop id."""
        import torch

        limit = int(request.get("max_tokens") or request.get("max_completion_tokens") or self.max_new_tokens)
        if limit < 1:
            raise PromptError(f"max_tokens {limit} must be at least 1")
        if float(request.get("temperature") or 0) > 0:
            raise PromptError("the fast path answers greedily; sampling takes the full path")
        with self.lock, torch.inference_mode():
            decoder, feed = Decoder(self.config, self.weights), ids
            for _ in range(limit):
                token = int(torch.argmax(decoder.forward(feed)))
                yield token
                if token in self.stop_ids or (stop is not None and stop.is_set()):
                    return
                feed = [token]

    def generate(self, ids: list[int], request: dict, stop=None) -> tuple[list[int], str]:
        new = list(self.tokens(ids, request, stop))
        return (new, "stop") if new and new[-1] in self.stop_ids else (new, "length")

    def stream(self, ids: list[int], request: dict, stop=None) -> Iterator[str]:
        """The answer's text in pieces, cut where transformers' TextStreamer cuts it: whole words, lines."""
        cache, shown = [], 0
        for token in self.tokens(ids, request, stop):
            cache.append(token)
            text = self.tokenizer.decode(cache)
            if text.endswith("\n"):
                piece, cache, shown = text[shown:], [], 0
            elif text and _is_cjk(ord(text[-1])):
                piece, shown = text[shown:], len(text)
            else:
                piece = text[shown: text.rfind(" ") + 1]
                shown += len(piece)
            if piece:
                yield piece
        if cache:
            rest = self.tokenizer.decode(cache)[shown:]
            if rest:
                yield rest


def _is_cjk(cp: int) -> bool:
    """The code-point ranges transformers' TextStreamer prints at once (one character is a word)."""
    return any(a <= cp <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                         (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))
