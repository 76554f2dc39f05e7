"""GPU tier: QLoRA (hf backend) and the unsloth backend through the real train stage (`run_train`).

Skipped without CUDA. Run on a GPU machine with the `gpu` extra installed:

    pytest -m gpu tests/test_gpu.py -q

The project is built in a temporary folder: a small Qwen2 model with the demo tokenizer (head size 64, the
size GPU kernels are tuned for), chats written as canonical records, the real tokenize stage, a hand-written
route plan, then `run_train`. unsloth runs in a child process: importing it patches transformers for the
whole process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")]


def _chats(n: int) -> list[dict]:
    """Canonical conversation records (what the validate stage writes), lengths varied."""
    records = []
    for i in range(n):
        question = f"Where is my order NW-{100000 + i}? " + "I ordered boots and a tent. " * (i % 5)
        answer = f"Order NW-{100000 + i} ships in {i % 7 + 1} days. " + "We are sorry for the wait. " * (1 + i % 9)
        records.append({
            "id": f"{i:016x}", "kind": "conversation", "split": "eval" if i % 10 == 0 else "train",
            "source": {"file": "synthetic", "line": i + 1},
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        })
    return records


@pytest.fixture(scope="module")
def gpu_project(tmp_path_factory) -> Path:
    """models/small (random Qwen2 with the demo tokenizer), artifacts/tokenize (real stage), lora and qlora plans."""
    from tunepath.demo import DemoConfig, build_demo_model, generate_demo_data
    from tunepath.sections import ModelConfig
    from tunepath.tokenize import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("gpu-project")
    demo = DemoConfig(hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=2,
                      pretrain_steps=0, max_position_embeddings=2048)
    generate_demo_data(root / "raw", demo)
    model_dir = build_demo_model(root / "models" / "small", demo, sorted((root / "raw").iterdir()))

    validate_dir = root / "artifacts" / "validate"
    (validate_dir / "records").mkdir(parents=True)
    (validate_dir / "records" / "records-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _chats(160)), encoding="utf-8")
    run_tokenize(TokenizeConfig(max_length=512), ModelConfig(base=str(model_dir)), validate_dir, root / "artifacts" / "tokenize")
    for method in ("lora", "qlora"):
        plan = {"stages": ["sft"], "method": method, "start_from": "base", "rules": []}
        (root / f"plan-{method}.json").write_text(json.dumps(plan), encoding="utf-8")
    return root


def _check_adapter_run(summary: dict, out: Path, backend: str, method: str) -> None:
    assert summary["backend"] == backend
    assert summary["method"] == method
    assert summary["weights"] == "adapter"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "metrics.json").is_file() and (out / "loss.csv").is_file()
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"])
    assert summary["final_loss"] < summary["first_loss"], "loss did not fall"
    assert 0 < summary["trainable_params"] < summary["total_params"]


def test_qlora_hf_trains_a_4bit_base(gpu_project):
    from tunepath.sections import ModelConfig
    from tunepath.train import TrainConfig
    from tunepath.train.quantize import load_4bit
    from tunepath.train.stage import run_train

    base = str(gpu_project / "models" / "small")
    cfg = TrainConfig(backend="hf", max_steps=12, batch_size=4, learning_rate=3e-3)
    model = load_4bit(base, cfg)
    quantised = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantised) == 4 * 7, quantised  # every decoder linear layer is NF4
    del model

    out = gpu_project / "artifacts" / "train-qlora"
    summary = run_train(cfg, ModelConfig(base=base), gpu_project / "plan-qlora.json", gpu_project / "artifacts" / "tokenize", out)
    _check_adapter_run(summary, out, "hf", "qlora")
    print("QLORA_SUMMARY", json.dumps(summary))


UNSLOTH_CHILD = """
import json, sys
from pathlib import Path
from tunepath.train.unsloth_backend import preload
preload()
from tunepath.sections import ModelConfig
from tunepath.train import TrainConfig
from tunepath.train.stage import run_train
root = Path(sys.argv[1])
out = {}
for method in ("lora", "qlora"):
    cfg = TrainConfig(backend="unsloth", max_steps=12, batch_size=4, learning_rate=3e-3)
    out[method] = run_train(cfg, ModelConfig(base=str(root / "models" / "small")), root / f"plan-{method}.json",
                            root / "artifacts" / "tokenize", root / "artifacts" / f"train-unsloth-{method}")
print("UNSLOTH_SUMMARY " + json.dumps(out))
"""


def test_unsloth_backend_trains_lora_and_qlora(gpu_project):
    pytest.importorskip("unsloth")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", UNSLOTH_CHILD, str(gpu_project)], capture_output=True, text=True, env=env,
                          cwd=str(gpu_project), timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("UNSLOTH_SUMMARY ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    summaries = json.loads(lines[-1][len("UNSLOTH_SUMMARY "):])
    for method, summary in summaries.items():
        _check_adapter_run(summary, gpu_project / "artifacts" / f"train-unsloth-{method}", "unsloth", method)
    print("UNSLOTH_SUMMARY", json.dumps(summaries))
