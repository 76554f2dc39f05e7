"""Several worker slots end to end (services tier): `tunepath up` with two `gpu` slots deploys `finetune` with a
concurrency of two; two runs created through the API as the UI's Run button does, with different learning rates,
run at the same time. One works in the project folder, the other in a working copy of its own (a DVC
experiment); each registered version's lineage is checked: its params, params hash and loss curve are its own,
and its registered artifact hash is the hash of the weights its params produced (the project's merge output for
the run in place, the experiment's merge output, applied from the shared DVC cache, for the isolated one).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime

import pytest
import yaml

from tests.test_concurrent_runs import check_version
from tests.test_services import SERVICE_OVERRIDES, run_like_ui, run_logs, services_project, wait_for_run
from tunepath import services
from tunepath.services import ServiceOptions, http, start_services, stop_services

pytestmark = pytest.mark.services

RATES = ("0.002", "0.004")


def test_two_worker_slots_run_two_deployment_runs_at_once_each_with_its_own_lineage(tmp_path, demo_assets):
    from mlflow import MlflowClient

    from tunepath.register.stage import artifact_hash

    root = services_project(tmp_path / "project", demo_assets, SERVICE_OVERRIDES + ["train.max_steps=20"])
    try:
        report = start_services(root, ServiceOptions(prefect_port=0, mlflow_port=0, timeout_s=300, gpu_slots=2))
        api = f"{report.prefect_url}/api"
        _, limit = http("GET", f"{api}/v2/concurrency_limits/{services.GPU_LIMIT}")
        _, dep = http("GET", f"{api}/deployments/name/finetune/finetune")
        assert limit["limit"] == 2
        assert (dep.get("global_concurrency_limit") or {}).get("limit", dep.get("concurrency_limit")) == 2

        runs = {lr: run_like_ui(api, "finetune", lambda p, lr=lr: p["config"]["train"].update(learning_rate=float(lr)))
                for lr in RATES}
        done = {lr: wait_for_run(api, run_id, timeout_s=3000) for lr, run_id in runs.items()}
        for lr, run in done.items():
            assert run["state"]["type"] == "COMPLETED", (lr, run_logs(api, runs[lr]))
        # at the same time, not one after the other: each started before the other ended
        span = {lr: (datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for lr, r in done.items()}
        (a0, a1), (b0, b1) = span.values()
        assert a0 < b1 and b0 < a1, span
        # which went where: the folder's params.yaml holds one rate, the one DVC experiment the other
        params = yaml.safe_load((root / "params.yaml").read_text())
        in_place = next(lr for lr in RATES if params["train"]["learning_rate"] == float(lr))
        isolated = next(lr for lr in RATES if lr != in_place)
        shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True,
                               text=True, check=True)
        [name] = [e["name"] for base in json.loads(shown.stdout) for e in (base.get("experiments") or [])]
        refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.split()
        ref = next(r for r in refs if r.endswith("/" + name))
        exp_params = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:params.yaml"], cwd=root, capture_output=True,
                                                   text=True, check=True).stdout)
        assert exp_params["train"]["learning_rate"] == float(isolated)

        client = MlflowClient(tracking_uri=report.mlflow_url)
        versions = sorted(client.search_model_versions("name='tunepath-demo'"), key=lambda v: int(v.version))
        assert len(versions) == 2
        by_lr = {client.get_run(v.run_id).data.params["train.learning_rate"]: v for v in versions}
        assert set(by_lr) == set(RATES)
        for lr, version in by_lr.items():
            check_version(client, version, lr, tmp_path / f"v{version.version}")  # params, loss peak, served weights
            assert client.get_run(version.run_id).data.tags.get("prefect.flow_run_id") == runs[lr]
        assert by_lr[RATES[0]].tags["artifact_hash"] != by_lr[RATES[1]].tags["artifact_hash"]

        # the weights the recorded params produced: the folder's for the run in place ...
        assert artifact_hash(root / "artifacts" / "merge" / "model") == by_lr[in_place].tags["artifact_hash"]
        # ... and the DVC experiment's for the isolated one, from the shared cache
        subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], cwd=root, capture_output=True, text=True, check=True)
        assert yaml.safe_load((root / "params.yaml").read_text())["train"]["learning_rate"] == float(isolated)
        assert artifact_hash(root / "artifacts" / "merge" / "model") == by_lr[isolated].tags["artifact_hash"]
        assert not [p for p in (root / ".tunepath" / "workspaces").iterdir() if p.is_dir()]

        # the Logs tab of each flow run, the isolated one's too: its stages' lines and tunepath's own
        for lr, run_id in runs.items():
            lines = flow_run_logs(api, run_id)
            text = "\n".join(f"{logger}: {message}" for logger, _, message in lines)
            for stage in ("validate", "tokenize", "route", "train", "evaluate", "merge", "register"):
                assert any(task and re.match(rf"{stage}: (running|restored|up to date)", m) for _, task, m in lines), (lr, stage, text[-3000:])
            assert any(logger.startswith("tunepath.") for logger, _, _ in lines), (lr, text[-3000:])
            assert any(m.startswith("done: ") for _, _, m in lines), (lr, text[-3000:])
        isolated_lines = [m for _, _, m in flow_run_logs(api, runs[isolated])]
        assert any(m.startswith("working copy ") and name in m for m in isolated_lines), isolated_lines[-20:]
        assert any(m.startswith(f"landed as DVC experiment {name}") for m in isolated_lines), isolated_lines[-20:]
    finally:
        stop_services(root)


def flow_run_logs(api: str, run_id: str) -> list[tuple[str, bool, str]]:
    """(logger, from a task run, message) of every line the flow run's Logs tab shows, through Prefect's client."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs, only = [], LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
    with SyncPrefectClient(api) as client:
        while True:  # a page at a time: the server answers at most 200
            page = client.read_logs(only, limit=200, offset=len(logs))
            logs += page
            if len(page) < 200:
                break
    return [(log.name, log.task_run_id is not None, log.message) for log in logs]
