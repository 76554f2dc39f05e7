"""DeepSeek-R1-Distill's real template and tokenizer, end to end on the CPU: reasoning data is validated,
tokenized with the reasoning inside the learnt span, trained, evaluated, merged and registered, and the merged
folder prompts the model exactly as training did (the generation prompt ends in `<think>\\n`)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_stages

pytestmark = pytest.mark.slow  # about three minutes on 2 cores: a 151,665-token vocabulary on the CPU

from tests.corpus.templates.load import build_tiny_model

ROWS = [
    {"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"<think>\nAdding {a} and {b} gives {a + b}.\n</think>\n\nThe answer is {a + b}."},
    ]}
    for a in range(2, 12) for b in range(3, 9)
]


@pytest.fixture(scope="module")
def r1_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("r1-project")
    build_tiny_model("deepseek-r1-distill-qwen", root / "models" / "r1")
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "reasoning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    results = run_stages(root, {
        "model": {"base": "models/r1"},
        "tokenize": {"max_length": 128},
        "route": {"force_stages": ["sft"]},  # 60 examples: fewer than the rules ask for before SFT
        "validate": {"eval_share": 0.1},
        "train": {"max_steps": 30, "learning_rate": 0.01, "batch_size": 8},
        # The gates are what an untrained tiny model cannot pass: this test is about the data path, not quality.
        "evaluate": {"samples": 4, "report_samples": 2, "max_new_tokens": 8, "benchmarks": [], "check_relevance": False,
                     "min_primary_gain": -1.0, "max_ppl_rise": 1000.0, "max_degenerate_share": 1.0},
        "register": {"model_name": "r1-test"},
    })
    return root, results


def test_reasoning_is_learnt_after_the_think_prompt(r1_run):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    root, results = r1_run
    stats = json.loads((root / "artifacts" / "tokenize" / "stats.json").read_text())["sft"]
    assert stats["train"]["reasoning_rebuilt"] == stats["train"]["samples_out"] > 0
    assert sum(v for k, v in stats["train"].items() if k.startswith("dropped_") and isinstance(v, int) and k != "dropped_tokens") == 0
    tokenizer = AutoTokenizer.from_pretrained(str(root / "artifacts" / "tokenize" / "tokenizer"))
    row = load_from_disk(str(root / "artifacts" / "tokenize" / "sft" / "eval"))[0]
    prompt = tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    learnt = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100], skip_special_tokens=False)
    assert learnt.startswith("Adding ") and "\n</think>\n\nThe answer is" in learnt and learnt.endswith("<｜end▁of▁sentence｜>")


def test_merged_model_prompts_as_training_did_and_is_registered(r1_run):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    root, results = r1_run
    served = AutoTokenizer.from_pretrained(str(root / "artifacts" / "merge" / "model"))
    for row, record in zip(load_from_disk(str(root / "artifacts" / "tokenize" / "sft" / "eval")), _eval_records(root)):
        history = [m for m in record["messages"][:-1]]
        assert row["prompt_ids"] == list(served.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False))
    model = json.loads((root / "artifacts" / "register" / "model.json").read_text())
    assert model["version"] and results["train"]["final_loss"] < results["train"]["first_loss"]


def _eval_records(root):
    from tunepath.records import read_records

    return list(read_records(root / "artifacts" / "validate", kind="conversation", split="eval"))
