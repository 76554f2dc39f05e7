"""tunepath export: GGUF files read back by llama.cpp's reader and transformers' GGUF loader, an Ollama Modelfile,
and a vLLM folder, for tiny random models of three architectures around real tokenizers of the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.corpus.templates.load import materialize


def tiny_model(entry: str, arch: str, dest: Path) -> Path:
    """A random-weight model of `arch` (qwen2, qwen3, llama) around the entry's tokenizer, saved as a merge would."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    materialize(entry, dest)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))  # tokenizer.json and chat_template.jinja, as the merge stage writes them
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[arch]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, max_position_embeddings=2048, tie_word_embeddings=arch != "llama",
                          eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model_class(config).save_pretrained(str(dest))
    return dest


# The real 150k vocabularies make a case take a minute: those run in the slow tier, the small one in every run.
CASES = [
    pytest.param("llama-3.2-instruct", "llama", "f16", id="llama-f16"),  # q/k rows reordered for llama.cpp, and back
    pytest.param("qwen2.5-instruct", "qwen2", "f32", id="qwen2.5-f32", marks=pytest.mark.slow),
    pytest.param("qwen3", "qwen3", "f16", id="qwen3-f16", marks=pytest.mark.slow),
    pytest.param("deepseek-r1-distill-qwen", "qwen2", "q8_0", id="r1-distill-q8_0", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("entry,arch,dtype", CASES)
def test_gguf_round_trip(tmp_path, entry, arch, dtype):
    from tunepath.export import export

    model = tiny_model(entry, arch, tmp_path / "model")
    written = export(model, tmp_path / "out", ("gguf", "ollama"), dtype)
    check = written["gguf"]["check"]
    assert check["probes"] == 4
    assert check["logit_gap"] <= {"f32": 1e-4, "f16": 2e-2, "q8_0": 1e-1}[dtype]
    if dtype == "f32":
        assert check["same_argmax"]
    modelfile = Path(written["ollama"]).read_text(encoding="utf-8")
    assert modelfile.startswith(f"FROM ./model-{dtype}.gguf")
    assert 'PARAMETER stop "' in modelfile


def test_modelfile_and_vllm_stop_tokens(tmp_path):
    from transformers import AutoTokenizer

    from tunepath.export import export

    model = tiny_model("qwen2.5-instruct", "qwen2", tmp_path / "model")
    written = export(model, tmp_path / "out", ("ollama", "vllm"), "f16", check=False)
    modelfile = Path(written["ollama"]).read_text(encoding="utf-8")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    folder = Path(written["vllm"])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (stops if isinstance(stops, list) else [stops])
    assert (folder / "chat_template.jinja").read_text() == (model / "chat_template.jinja").read_text()


def test_check_catches_a_changed_template(tmp_path):
    from tunepath.export.check import check_gguf
    from tunepath.export.gguf_file import write_gguf

    model = tiny_model("llama-3.2-instruct", "llama", tmp_path / "model")
    result = write_gguf(model, tmp_path / "model.gguf", "f16")
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    with pytest.raises(ValueError, match="chat template"):
        check_gguf(model, result.path, "f16")


def test_refuses_what_it_cannot_write(tmp_path):
    from tunepath.export.gguf_file import ExportError, write_gguf

    model = materialize("mistral-instruct-v0.3", tmp_path / "mistral")  # SentencePiece-style tokenizer.json
    (model / "config.json").write_text(json.dumps({"model_type": "mistral", "num_hidden_layers": 1}), encoding="utf-8")
    with pytest.raises(ExportError, match="SentencePiece"):
        write_gguf(model, tmp_path / "x.gguf")
    (model / "config.json").write_text(json.dumps({"model_type": "gemma2"}), encoding="utf-8")
    with pytest.raises(ExportError, match="gemma2"):
        write_gguf(model, tmp_path / "x.gguf")


def test_cli_names_a_missing_folder(tmp_path, capsys):
    from tunepath.cli import main

    assert main(["export", str(tmp_path / "nowhere")]) == 1
    assert "not a model folder" in capsys.readouterr().err


def test_the_cli_reads_the_gguf_back_without_a_progress_bar(tmp_path):
    """The check loads the file with transformers' GGUF loader, whose own tqdm bar would fill the terminal."""
    import os
    import subprocess
    import sys

    model = tiny_model("llama-3.2-instruct", "llama", tmp_path / "model")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(tmp_path), "export", str(model), "--format", "gguf",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr
    assert "(read back: logit gap" in done.stdout
    assert "checking model-f16.gguf: reading it back" in done.stderr
    assert "GGUF tensors" not in done.stderr and "it/s" not in done.stderr, done.stderr
