"""`tunepath route --profile FILE [--json]`: the shipped examples, JSON output, and errors that name the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunepath.route import RouteConfig
from tunepath.route.cli import route_main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "profiles").glob("*.yaml"))
EXPECTED = {  # example -> (stages, method, start_from, retrieval)
    "new_model": (["pretrain", "sft", "dpo"], "full", "scratch", "none"),
    "domain_cpt": (["cpt", "sft"], "full", "base", "none"),
    "sft_task": (["sft"], "full", "chat", "none"),
    "grounded_rag": (["sft"], "lora", "chat", "required"),
    "grounded_retrieval_only": ([], "lora", "chat", "required"),
    "styled_assistant": (["sft", "dpo"], "full", "chat", "none"),
    "limited_qlora": (["sft"], "qlora", "base", "none"),
    "limited_lora_cpt": (["cpt"], "lora", "base", "recommended"),
    "demo_cpu": (["sft"], "lora", "base", "recommended"),
    "lora_8b_24gb": (["sft"], "lora", "chat", "none"),
    "full_1.5b_80gb": (["sft"], "full", "base", "none"),
    "qlora_70b_80gb": (["sft"], "qlora", "base", "none"),
}
PROFILE = {
    "data": {"labeled_examples": 400, "unlabeled_tokens": 40000, "preference_pairs": 200},
    "resources": {"gpus": 0},
    "model": {"params_b": 0.0003},
    "intent": {"goal": "auto"},
}


def test_examples_cover_every_scenario():
    assert {p.stem for p in EXAMPLES} == set(EXPECTED)
    scenarios = set()
    for path in EXAMPLES:
        assert route_main(["--profile", str(path), "--json"]) == 0
    for path in EXAMPLES:
        plan = run_json(path)
        scenarios |= {r["scenario"] for r in plan["rules"]}
    assert {1, 2, 3, 4, 5, 6} <= scenarios


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_plans(path):
    plan = run_json(path)
    assert (plan["stages"], plan["method"], plan["start_from"], plan["retrieval"]) == EXPECTED[path.stem]


def run_json(path, *extra):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert route_main(["--profile", str(path), "--json", *extra]) == 0
    return json.loads(buf.getvalue())


def test_readable_output_explains(capsys):
    assert route_main(["--profile", str(EXAMPLES[0])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Training route") and "## Why" in out and "## Memory estimate" in out


def test_json_profile_and_overrides(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    plan = run_json(path)
    assert (plan["stages"], plan["method"]) == (["sft"], "lora")
    assert plan["profile"]["data"]["labeled_examples"] == 400
    raised = run_json(path, "--set", "sft_min_examples=500", "--set", "base_min_examples=500")
    assert raised["stages"] == []
    forced = run_json(path, "--set", "force_stages=[cpt, sft]")
    assert forced["forced"] is True and forced["stages"] == ["cpt", "sft"]


@pytest.mark.parametrize("change, message", [
    (lambda p: p["resources"].update(gpus=-1), "profile.resources.gpus: must be >= 0"),
    (lambda p: p["data"].pop("labeled_examples"), "profile.data.labeled_examples: is required"),
    (lambda p: p["resources"].update(gpus=2), "profile.resources.gpu_memory_gb: required when gpus > 0"),
    (lambda p: p["model"].update(size=7), "profile.model.size: is not a known field"),
    (lambda p: p["intent"].update(goal="chatbot"), "profile.intent.goal: Input should be 'auto'"),
    (lambda p: p["model"].update(params_b=0), "profile.model.params_b: must be > 0"),
    (lambda p: p.pop("resources"), "profile.resources: is required"),
])
def test_invalid_profile_names_the_field(tmp_path, capsys, change, message):
    profile = json.loads(json.dumps(PROFILE))
    change(profile)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(profile))
    assert route_main(["--profile", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("text, message", [
    ("data: [1, 2\n", "invalid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_unreadable_yaml(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert route_main(["--profile", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_file_and_bad_override(tmp_path, capsys):
    assert route_main(["--profile", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    good = tmp_path / "p.json"
    good.write_text(json.dumps(PROFILE))
    assert route_main(["--profile", str(good), "--set", "sft_min_examples=0"]) == 2
    assert "route.sft_min_examples: must be >= 1" in capsys.readouterr().err
    assert route_main(["--profile", str(good), "--set", "force_stages=[sft, cpt]"]) == 2
    assert "route.force_stages" in capsys.readouterr().err
    assert route_main(["--profile", str(good), "--set", "goal=task_skill"]) == 2  # would be ignored: refuse it
    assert "profile.intent.goal" in capsys.readouterr().err


def test_route_config_rejects_bad_values():
    with pytest.raises(ValueError, match="out of order"):
        RouteConfig(force_stages=["sft", "cpt"])
    with pytest.raises(ValueError, match="repeats"):
        RouteConfig(force_stages=["sft", "sft"])
    with pytest.raises(ValueError, match="extra"):
        RouteConfig(sft_min=3)


def test_import_stays_light():
    code = ("import sys, tunepath.route, tunepath.route.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'prefect', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_route_chooses_checkpointing_and_the_flags_set_it():
    path = next(p for p in EXAMPLES if "limited_qlora" in p.name)
    chosen, kept = run_json(path), run_json(path, "--gradient-checkpointing", "--micro-batch-tokens", "4096")
    assert chosen["train"]["gradient_checkpointing"] is True and chosen["train"]["set_by"]["gradient_checkpointing"] == "route"
    assert kept["train"]["set_by"] == {"gradient_checkpointing": "params", "checkpoint_offload": "route", "micro_batch_tokens": "params"}
    assert kept["train"]["micro_batch_tokens"] == 4096


def test_a_setting_that_cannot_fit_exits_2_with_the_estimate_and_the_knob(capsys):
    path = next(p for p in EXAMPLES if "limited_qlora" in p.name)
    assert route_main(["--profile", str(path), "--no-gradient-checkpointing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunepath route: train.gradient_checkpointing false (set in params): no method fits 14.40 GB")
    assert "train.gradient_checkpointing: true (or auto)" in err and len(err.splitlines()) == 1
