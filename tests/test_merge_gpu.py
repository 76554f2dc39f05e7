"""GPU tier: merging in bf16, and a QLoRA adapter merged into an unquantized copy of its 4-bit base.

    pytest -m gpu tests/test_merge_gpu.py -s      # needs CUDA, and bitsandbytes for the QLoRA test

Prints the parity numbers (how far bf16 rounding and 4-bit quantization move the merged model).
"""

from __future__ import annotations

import json

import pytest

from tests.test_promote_support import build_workspace, fast_config, make_train_dir
from tunepath.sections import ModelConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_assets):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return build_workspace(tmp_path_factory.mktemp("merge-gpu") / "ws", demo_assets / "models" / "demo")


def evaluate_and_merge(root, method: str, quantization: dict | None = None) -> tuple[dict, dict]:
    from tunepath.evaluate.stage import run_evaluate
    from tunepath.merge.stage import run_merge

    art = root / "artifacts"
    train = make_train_dir(root, 1.0)
    metrics = json.loads((train / "metrics.json").read_text())
    (train / "metrics.json").write_text(json.dumps({**metrics, "method": method, "quantization": quantization}))
    cfg = fast_config()
    evaluation = run_evaluate(cfg.evaluate, ModelConfig(), art / "validate", art / "tokenize", train, art / "evaluate")
    parity = run_merge(cfg.merge, ModelConfig(), art / "tokenize", train, art / "evaluate", art / "merge")
    print(f"\n{method}: evaluated in {evaluation['precision']}, parity {json.dumps(parity)}")
    return evaluation, parity


def test_bf16_lora_merge_passes_the_default_tolerances(workspace):
    evaluation, parity = evaluate_and_merge(workspace, "lora")
    assert evaluation["precision"] == "bf16" and parity["precision"] == "bf16"
    assert parity["passed"] and parity["relative_gap"] > 0  # bf16 rounding is visible, and within the bf16 bound


def test_qlora_adapter_merges_into_unquantized_base_and_reports_the_4bit_distance(workspace):
    pytest.importorskip("bitsandbytes")
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": "bfloat16"}
    _, parity = evaluate_and_merge(workspace, "qlora", quantization)
    config = json.loads((workspace / "artifacts" / "merge" / "model" / "config.json").read_text())
    assert parity["passed"] and "quantization_config" not in config
    q = parity["quantized"]
    assert q["measured"] is True and q["relative_gap"] > 0 and q["loss_4bit"] > 0 and q["loss_merged"] > 0
