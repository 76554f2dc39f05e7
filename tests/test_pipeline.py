"""The whole pipeline through the real Prefect flow, DVC ledger and MLflow registry, on the tiny demo model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import FAST_OVERRIDES, make_project
from tunepath.config import STAGES


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_assets):
    """One project with one completed `finetune` flow run (shared by the tests of this module)."""
    from flows.finetune import finetune
    from tunepath.params import load_config
    from tunepath.stages import default_tracking_uri

    root = make_project(tmp_path_factory.mktemp("e2e") / "project", demo_assets)
    cfg = load_config(root / "params.yaml", FAST_OVERRIDES)
    state = finetune(config=cfg, project_dir=str(root), tracking_uri=default_tracking_uri(root), return_state=True)
    return root, cfg, {**state.result(), "flow_run_id": state.state_details.flow_run_id}


def test_every_stage_runs_and_writes_its_folder(finished):
    root, _, result = finished
    assert result["ran"] == list(STAGES)
    for stage in STAGES:
        assert any((root / "artifacts" / stage).iterdir()), f"{stage} wrote nothing"


def test_tuned_model_beats_base_on_held_out_data(finished):
    root, _, _ = finished
    metrics = json.loads((root / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert metrics["tuned_loss"] < metrics["base_loss"]
    assert metrics["passed"] is True


def test_overrides_are_written_to_params_for_dvc(finished):
    import yaml

    root, _, _ = finished
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["evaluate"]["benchmark_limit"] == 20


def test_dvc_status_is_clean_after_the_flow(finished):
    root, _, _ = finished
    out = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout, out.stdout


def test_registered_candidate_loads_from_mlflow_and_generates(finished):
    import mlflow

    from tunepath.stages import default_tracking_uri

    root, _, _ = finished
    record = json.loads((root / "artifacts" / "register" / "model.json").read_text())
    assert record["uri"] == "models:/tunepath-demo@candidate"
    assert record["tags"]["git_commit"] and record["tags"]["data_hash"]
    mlflow.set_tracking_uri(default_tracking_uri(root))
    model = mlflow.pyfunc.load_model("models:/tunepath-demo@candidate")
    out = model.predict({"messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 12})
    text = out[0]["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip()


def test_one_mlflow_run_named_after_the_flow_run_holds_the_training_and_the_model(finished):
    from mlflow import MlflowClient

    from tunepath.stages import default_tracking_uri

    root, _, result = finished
    client = MlflowClient(default_tracking_uri(root))
    record = json.loads((root / "artifacts" / "register" / "model.json").read_text())
    version = client.get_model_version(record["name"], record["version"])
    assert version.run_id == record["run_id"] == result["mlflow_run_id"]
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run.data.tags["prefect.flow_run_name"] and run.data.tags["prefect.flow_run_id"]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]  # the only one
    steps = (root / "artifacts" / "train" / "loss.csv").read_text().splitlines()[1:]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(steps) > 0  # training's curve, live
    assert "tuned_perplexity" in run.data.metrics  # and the evaluation, logged by register
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "train")}
    assert {"train/loss.png", "train/loss.csv", "train/metrics.json"} <= logged
    assert any(a.path == "model" for a in client.list_artifacts(run.info.run_id)) or client.get_logged_model(
        client.search_logged_models([run.info.experiment_id])[0].model_id).source_run_id == run.info.run_id
    card = version.description
    assert card.startswith(f"# {record['name']} version {record['version']}")
    for part in ("## Route and why", "## Data", "## Evaluation", "(primary)", "tunepath chat models:/tunepath-demo@candidate",
                 run.data.tags["prefect.flow_run_name"], record["tags"]["data_hash"]):
        assert part in card, part
    # the run's address is an artifact of the flow run itself (its Artifacts tab), not of the stage that opened the run
    link = [a for a in flow_run_artifacts(result["flow_run_id"]) if a.key == "tunepath-mlflow-run"]
    assert len(link) == 1 and link[0].task_run_id is None, [(a.key, a.task_run_id) for a in link]
    assert run.info.run_id in link[0].data


def test_without_the_flow_register_logs_into_the_run_training_opened(finished, tmp_path):
    """`dvc repro` runs each stage in its own process and no flow opens a run: training's own run (its id in
    artifacts/train/metrics.json) gets the model, so that pipeline run is one MLflow run too."""
    import shutil

    from mlflow import MlflowClient

    from tunepath.register.stage import run_register
    from tunepath.train.tracking import MlflowSink

    root, cfg, _ = finished
    copy = tmp_path / "project"
    shutil.copytree(root / "artifacts", copy / "artifacts", ignore=shutil.ignore_patterns("register", "checkpoints"))
    shutil.copytree(root / "data", copy / "data")  # the data version the card and tags name
    uri = f"sqlite:///{tmp_path / 'alone.db'}"
    sink = MlflowSink(uri, cfg.register.experiment, copy / "mlartifacts", None, {})  # as `tunepath stage train` opens it
    sink.log({"loss": 1.0}, 1)
    sink.finish()
    metrics = copy / "artifacts" / "train" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "mlflow_run_id": sink.run_id}))
    record = run_register(cfg.register, cfg.model_dump(mode="json"), copy, uri, copy / "artifacts", copy / "artifacts" / "register")
    client = MlflowClient(uri)
    assert record["run_id"] == sink.run_id
    assert client.get_model_version(record["name"], record["version"]).run_id == sink.run_id
    assert len(client.search_runs([client.get_run(sink.run_id).info.experiment_id])) == 1
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def test_the_loss_png_renders_in_dvc_plots_offline(finished, tmp_path):
    root, _, _ = finished
    png = root / "artifacts" / "train" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots")], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "<script" not in html  # nothing to fetch from a CDN: the page is whole offline
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert sources and all((tmp_path / "plots" / s).read_bytes() == png.read_bytes() for s in sources)


def test_second_run_skips_every_stage(finished):
    from flows.finetune import finetune

    from mlflow import MlflowClient

    from tunepath.stages import default_tracking_uri

    root, cfg, first = finished
    keys = [f"tunepath-{stage}" for stage in STAGES if stage != "merge"] + ["tunepath-evaluate-samples"]
    before = artifact_counts(keys)
    client = MlflowClient(default_tracking_uri(root))
    runs_before = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    # other data.num_proc and memory_gb: how the data stages run, not what they write, so nothing reruns
    again = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_proc": 1, "memory_gb": 2.0})})
    state = finetune(config=again, project_dir=str(root), return_state=True)
    result = state.result()
    assert result["ran"] == []
    assert result["skipped"] == list(STAGES)
    # nothing ran, so no MLflow run was opened: the result names the run that made the registered model
    runs_after = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert runs_after == runs_before
    record = json.loads((root / "artifacts" / "register" / "model.json").read_text())
    assert result["mlflow_run_reused"] and result["mlflow_run_id"] == record["run_id"] in runs_before
    note = [a for a in flow_run_artifacts(state.state_details.flow_run_id) if a.key == "tunepath-mlflow-run"]
    assert len(note) == 1 and "Every stage was up to date" in note[0].data and record["run_id"] in note[0].data
    # in the Prefect UI the first run's stages are Completed, the second's Cached with the reason
    assert {name: s.name for name, s in task_states(first["flow_run_id"]).items()} == {stage: "Completed" for stage in STAGES}
    second = task_states(state.state_details.flow_run_id)
    assert {name: (s.type.value, s.name) for name, s in second.items()} == {stage: ("COMPLETED", "Cached") for stage in STAGES}
    assert all(s.message == f"{name}: up to date in dvc.lock (inputs, params and outputs unchanged)" for name, s in second.items())
    # the skipped stages still show their reports on the new run's page
    after = artifact_counts(keys)
    assert {k: after[k] - before[k] for k in keys} == {k: 1 for k in keys}


def task_states(flow_run_id) -> dict:
    """Each task run's final state in one flow run, by task run name (the stage)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state for run in runs}


def flow_run_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def artifact_counts(keys: list[str]) -> dict[str, int]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return {k: sum(1 for a in found if a.key == k) for k in keys}


def test_a_run_against_another_registry_registers_there(finished):
    """DVC cannot see MLflow: pointed at a registry without the model (a new server, a deleted mlflow.db), the
    flow registers again, and only registers (a deleted file is covered in test_promote.py: the in-process
    MLflow store keeps its SQLite file open, so deleting it here would not show)."""
    from flows.finetune import finetune
    from tunepath.register.check import registry_gap

    root, cfg, _ = finished
    other = f"sqlite:///{root / 'other-registry.db'}"
    assert "does not exist" in registry_gap(root / "artifacts" / "register" / "model.json", other)
    result = finetune(config=cfg, project_dir=str(root), tracking_uri=other)
    assert result["ran"] == ["register"]
    assert registry_gap(root / "artifacts" / "register" / "model.json", other) is None
