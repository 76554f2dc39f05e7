"""The merge stage: the merged folder behaves like base + adapter and like the model that was evaluated, renders
chats as training did, and a mismatched adapter fails the parity checks."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_promote_support import build_workspace, fast_config, make_train_dir
from tunepath.merge.parity import ParityError, template_parity
from tunepath.sections import ModelConfig


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_assets):
    """A workspace whose evaluate stage scored the repair adapter of scale 1."""
    from tunepath.evaluate.stage import run_evaluate

    root = build_workspace(tmp_path_factory.mktemp("merge") / "ws", demo_assets / "models" / "demo")
    art = root / "artifacts"
    make_train_dir(root, 1.0)
    run_evaluate(fast_config().evaluate, ModelConfig(), art / "validate", art / "tokenize", art / "train", art / "evaluate")
    return root


def merge(root, **settings) -> dict:
    from tunepath.merge.stage import run_merge

    art = root / "artifacts"
    cfg = fast_config().merge.model_copy(update=settings)
    return run_merge(cfg, ModelConfig(), art / "tokenize", art / "train", art / "evaluate", art / "merge")


def test_merged_folder_matches_base_plus_adapter_and_the_evaluated_model(workspace):
    from transformers import AutoTokenizer, GenerationConfig

    make_train_dir(workspace, 1.0)
    parity = merge(workspace)
    model_dir = workspace / "artifacts" / "merge" / "model"
    assert parity["passed"] and parity["precision"] == "fp32"
    assert parity["relative_gap"] < 1e-5 and parity["evaluated_gap"] < 1e-5
    assert parity["template"] == {**parity["template"], "equal": True, "conversation_equal": True, "prompt_equal": True}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in model_dir.iterdir()}
    assert not (model_dir / "adapter_config.json").exists()
    im_end = AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids("<|im_end|>")
    assert im_end in GenerationConfig.from_pretrained(str(model_dir)).eos_token_id  # serving stops at the end of a turn
    assert json.loads((workspace / "artifacts" / "merge" / "parity.json").read_text())["passed"] is True


def test_adapter_changed_after_evaluation_fails_parity(workspace):
    """Merged and base + adapter still agree with each other; the evaluated losses catch the swap."""
    from safetensors.torch import load_file, save_file

    train = make_train_dir(workspace, 1.0)
    weights = train / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: (v * 1.3 if "lora_B" in k else v).contiguous() for k, v in tensors.items()}, str(weights))
    with pytest.raises(ParityError, match="evaluate stage measured"):
        merge(workspace)
    parity = json.loads((workspace / "artifacts" / "merge" / "parity.json").read_text())
    assert parity["passed"] is False and parity["relative_gap"] < 1e-5 and parity["evaluated_gap"] > 0.01


def test_adapter_of_another_rank_does_not_fit_the_base(workspace):
    train = make_train_dir(workspace, 1.0)
    config = json.loads((train / "adapter" / "adapter_config.json").read_text())
    (train / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    with pytest.raises(ParityError, match="does not fit the base model"):
        merge(workspace)


def test_evaluated_rows_must_be_the_rows_scored_now():
    from tunepath.merge.parity import evaluated_gap

    assert evaluated_gap([(-10.0, 5)], [{"logprob": -10.1, "tokens": 5}]) == pytest.approx(0.02 / 2.02)
    with pytest.raises(ParityError, match="data changed"):
        evaluated_gap([(-10.0, 5)], [{"logprob": -10.0, "tokens": 6}])


def test_template_parity_detects_a_different_chat_template(workspace, tmp_path):
    from tunepath.tokenize.templates import LLAMA2

    make_train_dir(workspace, 1.0)
    merge(workspace)
    other = tmp_path / "other"
    shutil.copytree(workspace / "artifacts" / "merge" / "model", other)
    (other / "chat_template.jinja").write_text(LLAMA2, encoding="utf-8")
    result = template_parity(workspace / "artifacts" / "tokenize", other)
    assert result["equal"] is False and result["conversation_equal"] is False


def test_qlora_adapter_merges_into_an_unquantized_base(workspace):
    train = make_train_dir(workspace, 1.0)
    metrics = json.loads((train / "metrics.json").read_text())
    (train / "metrics.json").write_text(json.dumps({**metrics, "method": "qlora"}))
    parity = merge(workspace)
    config = json.loads((workspace / "artifacts" / "merge" / "model" / "config.json").read_text())
    assert parity["passed"] and "quantization_config" not in config
    assert parity["quantized"]["measured"] is False and "GPU" in parity["quantized"]["reason"]


def test_full_fine_tune_is_packaged_as_it_is(workspace, tmp_path):
    """method full: the weights in train/model are packaged; evaluated and packaged losses agree."""
    from tunepath.evaluate.stage import run_evaluate
    from tunepath.merge.stage import run_merge

    art = workspace / "artifacts"
    train = tmp_path / "train"
    shutil.copytree(workspace / "models" / "noised", train / "model")  # a "fine-tune" that changed nothing
    metrics = {"backend": "hf", "method": "full", "start_model": str(workspace / "models" / "noised"), "stages": [{"stage": "sft"}]}
    (train / "metrics.json").write_text(json.dumps(metrics))
    run_evaluate(fast_config(min_primary_gain=-1.0).evaluate, ModelConfig(), art / "validate", art / "tokenize", train, tmp_path / "evaluate")
    parity = run_merge(fast_config().merge, ModelConfig(), art / "tokenize", train, tmp_path / "evaluate", tmp_path / "merge")
    assert parity["passed"] and parity["method"] == "full" and parity["relative_gap"] == 0.0
    assert (tmp_path / "merge" / "model" / "model.safetensors").exists()
