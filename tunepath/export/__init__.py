"""Exports of a merged model for the runtimes people serve with.

    tunepath export                                   # artifacts/merge/model -> artifacts/export/ (gguf, ollama, vllm)
    tunepath export models:/tunepath-demo@champion --format gguf --dtype q8_0

- `gguf`: one GGUF file for llama.cpp (`gguf_file.write_gguf`), read back and compared (`check.check_gguf`);
- `ollama`: that file with a `Modelfile` (the template, its stop tokens);
- `vllm`: a folder `vllm serve` takes as it is: safetensors, tokenizer, the training chat template, and a
  generation config whose stop ids hold the end-of-turn token.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("gguf", "ollama", "vllm")


def export(model_dir: Path, out_dir: Path, formats: tuple[str, ...] = FORMATS, dtype: str = "f16", check: bool = True) -> dict:
    """Write the asked formats under `out_dir`; returns what was written, with the GGUF round-trip figures."""
    from transformers import AutoTokenizer

    from tunepath.export.gguf_file import ExportError, write_gguf

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"--format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    stops = stop_tokens(tokenizer)
    written: dict = {}
    if "gguf" in formats or "ollama" in formats:
        result = write_gguf(model_dir, out_dir / "gguf" / f"model-{dtype}.gguf", dtype)
        written["gguf"] = {"path": str(result.path), "architecture": result.architecture, "tensors": result.tensors, "bytes": result.bytes}
        if check:
            from tunepath.export.check import check_gguf

            log.info("checking %s: reading it back (tokenizer, weights, logits)", result.path.name)
            written["gguf"]["check"] = check_gguf(model_dir, result.path, dtype)
        if "ollama" in formats:
            written["ollama"] = str(write_modelfile(model_dir, result.path, out_dir / "gguf" / "Modelfile", stops))
    if "vllm" in formats:
        written["vllm"] = str(write_vllm_folder(model_dir, out_dir / "vllm", sorted({tokenizer.convert_tokens_to_ids(t) for t in stops})))
    (out_dir / "export.json").write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return written


def stop_tokens(tokenizer) -> list[str]:
    """The texts that end an assistant turn: the eos token and the template's end-of-turn token."""
    from tunepath.tokenize.render import ChatRenderer, added_token_pattern, guarded_tokens
    from tunepath.tokenize.turns import find_end_of_turn

    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if tokenizer.chat_template:
        pattern = added_token_pattern(guarded_tokens(tokenizer).values())
        end = find_end_of_turn(ChatRenderer(tokenizer, tokenizer.chat_template), pattern)
        if end and end not in stops:
            stops.append(end)
    return stops


CHATML_OLLAMA = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
'''


def write_modelfile(model_dir: Path, gguf_path: Path, path: Path, stops: list[str]) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile`.

    ChatML templates get their Go-template form; for others Ollama reads the Jinja template stored in the GGUF
    (`tokenizer.chat_template`) and picks its matching built-in template. Stop tokens are set either way.
    """
    template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8") if (model_dir / "chat_template.jinja").exists() else ""
    lines = [f"FROM ./{Path(gguf_path).name}"]
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{CHATML_OLLAMA}"""')
    else:
        lines.append("# TEMPLATE: none here; Ollama uses the chat template stored in the GGUF file")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_vllm_folder(model_dir: Path, out: Path, stop_ids: list[int]) -> Path:
    """The merged folder as vLLM serves it, with every stop id in generation_config.json."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.bin", "training_args*", "parity.json"))
    path = out / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    config["eos_token_id"] = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
