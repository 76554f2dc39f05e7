"""MLflow runs after faults: a run whose process was killed is marked FAILED by the next start, and a resumed
training logs each step once. Real MLflow on SQLite; the killed process is a real process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KILLED = """
    import os, signal, sys
    from mlflow import MlflowClient
    from tunepath.registry import process_tags
    client = MlflowClient(sys.argv[1])
    experiment = client.get_experiment_by_name("tunepath").experiment_id
    run = client.create_run(experiment, tags=process_tags(), run_name="register")
    print(run.info.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as a kill during register: the run is never ended
"""


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("tunepath", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri, client


def test_a_run_left_running_by_a_killed_process_is_marked_failed_on_the_next_start(store, tmp_path):
    from tunepath.registry import HOST_TAG, fail_orphaned_runs, process_tags
    from tunepath.train.tracking import MlflowSink

    uri, client = store
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED), uri], capture_output=True, text=True,
                            env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    orphan = killed.stdout.split()[0]
    experiment = client.get_experiment_by_name("tunepath").experiment_id
    alive = client.create_run(experiment, tags=process_tags()).info.run_id  # this test's process: still running
    elsewhere = client.create_run(experiment, tags={**process_tags(), HOST_TAG: "another-machine"}).info.run_id
    untagged = client.create_run(experiment).info.run_id
    assert client.get_run(orphan).info.status == "RUNNING"

    MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", None, {})  # the next training's start

    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "ended without finishing this run (killed?)" in run.data.tags["tunepath.ended"]
    assert {client.get_run(r).info.status for r in (alive, elsewhere, untagged)} == {"RUNNING"}
    assert fail_orphaned_runs(client) == []  # once is enough


def test_a_resumed_training_logs_each_step_once(store, tmp_path):
    import mlflow

    from tunepath.train.tracking import MlflowSink

    uri, client = store
    first = MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", None, {})
    for step in range(1, 11):  # checkpoint at 5, killed after 10
        first.log({"loss": 1.0 / step, "learning_rate": 1e-3}, step)
    mlflow.flush_async_logging()
    resumed = MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", first.run_id, {})  # resume from step 5
    assert resumed.run_id == first.run_id
    for step in range(6, 16):
        resumed.log({"loss": 1.0 / step, "learning_rate": 1e-3, "grad_norm": 0.5}, step)
    resumed.finish()
    for key, steps in (("loss", range(1, 16)), ("learning_rate", range(1, 16)), ("grad_norm", range(6, 16))):
        logged = sorted(m.step for m in client.get_metric_history(first.run_id, key))
        assert logged == list(steps), key
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_training_logs_into_the_pipeline_run_and_leaves_ending_it_to_the_flow(store, tmp_path):
    from tunepath.registry import PIPELINE_TAG, end_pipeline_run, open_pipeline_run
    from tunepath.train.tracking import MlflowSink

    uri, client = store
    run_id = open_pipeline_run(uri, "tunepath", tmp_path / "mlartifacts", "steel-bobcat", {"prefect.flow_run_id": "f-1"})
    sink = MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", None, {"route.method": "lora"}, pipeline_run_id=run_id)
    assert sink.run_id == run_id and not sink.owned
    for step in range(1, 4):
        sink.log({"loss": 1.0 / step}, step)
    sink.finish()
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the flow ends its run, after register
    assert run.info.run_name == "steel-bobcat" and run.data.tags[PIPELINE_TAG] == "true"
    assert run.data.tags["prefect.flow_run_id"] == "f-1" and run.data.tags["route.method"] == "lora"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    experiment = client.get_experiment_by_name("tunepath").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # no second run
    end_pipeline_run(uri, run_id, failed=True, note="evaluate: evaluation gate failed")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["tunepath.outcome"] == "evaluate: evaluation gate failed"


def test_a_pipeline_run_that_is_gone_gives_training_a_run_of_its_own(store, tmp_path):
    from tunepath.train.tracking import MlflowSink

    uri, client = store
    sink = MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", None, {}, pipeline_run_id="0" * 32)
    assert sink.owned and sink.run_id != "0" * 32
    assert client.get_run(sink.run_id).info.run_name.startswith("pipeline-")
    sink.finish()
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def test_the_model_card_says_base_route_data_metrics_and_how_to_chat():
    from tunepath.register.card import model_card

    c = {"base": {"value": 0.121, "low": 0.094, "high": 0.155}, "tuned": {"value": 0.479, "low": 0.352, "high": 0.600},
         "diff": {"value": 0.358, "low": 0.229, "high": 0.482}}
    card = model_card(
        "tunepath-demo", "3", "candidate", base_model="models/demo",
        plan={"stages": ["sft"], "method": "lora", "start_from": "base", "retrieval": "recommended",
              "rules": [{"id": "S3-sft", "reason": "371 labelled examples >= 100 (sft_min_examples): SFT"}],
              "warnings": ["little labelled data and no chat variant"]},
        train={"stages": [{"stage": "sft", "steps": 60}], "first_loss": 2.1, "final_loss": 0.56, "backend": "hf",
               "backend_reason": "auto: no CUDA GPU", "precision": "fp32", "trainable_params": 1000, "total_params": 688936},
        evaluation={"split_kind": "sft", "eval_rows": 23, "primary_metric": "rouge_l", "comparison": {"rouge_l": c},
                    "gates": {"primary": {"passed": True}, "perplexity": {"passed": True}}},
        validate={"totals": {"read": 906, "accepted": 889, "rejected": 17}, "splits": {"train": 842, "eval": 47}},
        tokenize={"max_length": 256, "labeled_examples": 371, "unlabeled_tokens": 13318, "preference_pairs": 186,
                  "sft": {"train": {"truncated": 2, "dropped_too_long": 1}}},
        tags={"data_hash": "eb3169a6e35c6e7e3a74f59aee390aa9.dir", "git_commit": "af963a9f8bb3aa", "params_hash": "1234"},
        run={"run_id": "r1", "url": None, "flow_run": "steel-bobcat"})
    assert card.startswith("# tunepath-demo version 3\n")
    assert "**`models/demo`** with lora SFT" in card
    assert "371 labelled examples >= 100 (sft_min_examples): SFT" in card
    assert "eb3169a6e35c6e7e3a74f59aee390aa9.dir" in card and "889 of 906 rows accepted (842 train, 47 held out)" in card
    assert "(2 truncated, 1 dropped)" in card
    assert "| **rouge_l** (primary) | 0.121 [0.094, 0.155] | 0.479 [0.352, 0.600] | 0.358 [0.229, 0.482] |" in card
    assert "Gates: primary passed, perplexity passed" in card
    assert "tunepath chat models:/tunepath-demo@candidate" in card
    assert "Prefect flow run `steel-bobcat`" in card
