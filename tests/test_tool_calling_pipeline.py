"""A public tool-calling set (LLaMA-Factory's glaive demo, ShareGPT layout with `tools`, `function_call` and
`observation` turns) through every stage on the demo model, whose template is Qwen2.5's tool-calling ChatML:
tool calls are learnt, tool results never, and the registered model prompts with the declared tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_stages

pytestmark = pytest.mark.slow  # every stage, on 42 conversations of up to 1,024 tokens

CORPUS = Path(__file__).parent / "corpus" / "data" / "llamafactory"


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, demo_assets):
    root = tmp_path_factory.mktemp("tool-project")
    shutil.copytree(demo_assets / "models", root / "models")
    (root / "data" / "raw").mkdir(parents=True)
    for name in ("glaive_toolcall_en_demo.json", "glaive_toolcall_zh_demo.json"):
        shutil.copy(CORPUS / name, root / "data" / "raw" / name)
    results = run_stages(root, {
        "tokenize": {"max_length": 1024},
        "validate": {"eval_share": 0.15},
        "route": {"force_stages": ["sft"]},  # 42 examples: fewer than the rules ask for before SFT
        "train": {"max_steps": 10, "batch_size": 4},
        # The gates are what an untrained tiny model cannot pass: this test is about the data path, not quality.
        "evaluate": {"samples": 4, "report_samples": 2, "max_new_tokens": 8, "benchmarks": [], "check_relevance": False,
                     "min_primary_gain": -1.0, "max_ppl_rise": 1000.0, "max_degenerate_share": 1.0},
        "register": {"model_name": "tool-test"},
    })
    return root, results


def test_tool_calls_are_learnt_and_results_are_not(tool_run):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    root, results = tool_run
    stats = json.loads((root / "artifacts" / "tokenize" / "stats.json").read_text())["sft"]["train"]
    assert stats["samples_out"] > 0 and stats.get("dropped_tools_unsupported", 0) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(root / "artifacts" / "tokenize" / "tokenizer"))
    calls = results_seen = 0
    for split in ("train", "eval"):
        for row in load_from_disk(str(root / "artifacts" / "tokenize" / "sft" / split)):
            learnt = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
            calls += learnt.count("<tool_call>")
            results_seen += learnt.count("<tool_response>")
    assert calls > 0, "no tool call was learnt"
    assert results_seen == 0, "a tool result was learnt"


def test_registered_model_prompts_with_the_declared_tools(tool_run):
    from datasets import load_from_disk

    root, _ = tool_run
    rows = load_from_disk(str(root / "artifacts" / "tokenize" / "sft" / "eval"))
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(root / "artifacts" / "merge" / "model"))
    prompts = [served.decode(r["prompt_ids"]) for r in rows]
    assert any("# Tools" in p and "<tools>" in p for p in prompts)
    assert json.loads((root / "artifacts" / "register" / "model.json").read_text())["version"]
