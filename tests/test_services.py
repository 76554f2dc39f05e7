"""`tunepath up`/`down`: the local services, the deployments and the team infrastructure files.

The fast tests check the process bookkeeping, prefect.yaml and infra/ without starting servers. The `services`
tier starts a Prefect server, an MLflow server and a worker on free loopback ports for a temporary project,
creates flow runs of the deployments through the Prefect API as the UI's Run button does, and stops everything.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST_OVERRIDES, REPO, make_project
from tunepath import services
from tunepath.services import ServiceOptions, http, running_pid, start_services, stop_services

TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
FINISHED: dict[str, str] = {}  # flow runs the services tests completed, by deployment
# These tiers test orchestration, not model quality: a few training steps, and the generation gates (which a
# model this briefly trained may miss) off; the perplexity gate stays. The end-to-end tests own the gates.
SERVICE_OVERRIDES = FAST_OVERRIDES + ["evaluate.min_stop_share=0", "evaluate.max_degenerate_share=1"]


# ---------------------------------------------------------------- helpers shared with test_browser.py


def services_project(dest: Path, assets: Path, overrides: list[str]) -> Path:
    """A project like a fresh clone: code, flows, tasks, prefect.yaml, demo data and model, params with overrides."""
    from tunepath.params import load_config, write_params

    root = make_project(dest, assets)
    for name in ("flows", "tasks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    write_params(root / "params.yaml", load_config(root / "params.yaml", overrides))
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "flows and deployments"], cwd=root, check=True)
    return root


@contextmanager
def running_services(root: Path):
    """Start the services on free loopback ports; always stop every process they started."""
    try:
        yield start_services(root, ServiceOptions(prefect_port=0, mlflow_port=0, timeout_s=300))
    finally:
        stop_services(root)


def run_like_ui(api: str, deployment: str, change=None) -> str:
    """POST create_flow_run with the deployment's parameters (edited by `change`), as the UI's custom run does."""
    status, dep = http("GET", f"{api}/deployments/name/{deployment}/{deployment}")
    assert status == 200, dep
    params = copy.deepcopy(dep["parameters"])
    if change:
        change(params)
    body = {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"}, "parameters": params,
            "enforce_parameter_schema": True}
    status, run = http("POST", f"{api}/deployments/{dep['id']}/create_flow_run", body)
    assert status == 201, run
    return run["id"]


def wait_for_run(api: str, run_id: str, timeout_s: float = 1500) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, run = http("GET", f"{api}/flow_runs/{run_id}")
        if status == 200 and run["state"]["type"] in TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout_s} s")


def run_logs(api: str, run_id: str) -> str:
    _, logs = http("POST", f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)[-4000:]


def changed_max_steps(root: Path) -> int:
    return yaml.safe_load((root / "params.yaml").read_text())["train"]["max_steps"] + 10


def process_tree(root: Path) -> list[int]:
    import psutil

    pids = []
    for name in services.SERVICES:
        pid = running_pid(root, name)
        if pid:
            pids += [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return pids


# ---------------------------------------------------------------- fast: bookkeeping and files


def test_pid_files_track_exactly_the_started_process_and_down_stops_its_children(tmp_path):
    import psutil

    for sub in ("pids", "logs"):
        (tmp_path / ".tunepath" / sub).mkdir(parents=True)
    # a stand-in service with a child process, like a server with its uvicorn worker
    pid = services.spawn(tmp_path, "worker", [sys.executable, "-c",
                         "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                         services.service_env(tmp_path))
    deadline = time.monotonic() + 20
    while not psutil.Process(pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = psutil.Process(pid).children()[0].pid
    assert running_pid(tmp_path, "worker") == pid
    assert services.log_file(tmp_path, "worker").exists()
    done = stop_services(tmp_path)
    assert done["worker"] == f"stopped (pid {pid})" and done["prefect"] == "not running"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert running_pid(tmp_path, "worker") is None


def test_a_service_is_still_known_after_the_clock_steps_a_second(tmp_path, monkeypatch):
    """psutil's create_time is boot time (whole seconds in /proc/stat, moved by clock adjustments) plus ticks:
    a step of one second made `down` take the service for another process and leave it running."""
    import psutil
    import psutil._pslinux

    for sub in ("pids", "logs"):
        (tmp_path / ".tunepath" / sub).mkdir(parents=True)
    pid = services.spawn(tmp_path, "mlflow", [sys.executable, "-c", "import time; time.sleep(60)"], services.service_env(tmp_path))
    boot = psutil._pslinux.boot_time()
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot + 1.0)
    assert abs(psutil.Process(pid).create_time() - float(services.pid_file(tmp_path, "mlflow").read_text().split()[1])) >= 1.0
    assert running_pid(tmp_path, "mlflow") == pid
    assert stop_services(tmp_path)["mlflow"] == f"stopped (pid {pid})"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_down_stops_an_orphan_left_in_the_services_session(tmp_path):
    """A process whose parent died is handed to init, out of reach of `children()`; it is still in the session
    `spawn` made for the service."""
    import psutil

    for sub in ("pids", "logs"):
        (tmp_path / ".tunepath" / sub).mkdir(parents=True)
    orphan_pid = tmp_path / "orphan.pid"
    # a shell that starts `sleep` in the background and exits: the sleep's parent is gone
    script = ("import subprocess, time; "
              f"subprocess.Popen(['sh', '-c', 'sleep 60 & echo $! > {orphan_pid}.tmp && mv {orphan_pid}.tmp {orphan_pid}']).wait(); "
              "time.sleep(60)")
    pid = services.spawn(tmp_path, "worker", [sys.executable, "-c", script], services.service_env(tmp_path))
    deadline = time.monotonic() + 20
    while not orphan_pid.exists() or psutil.Process(pid).children():
        assert time.monotonic() < deadline, "the stand-in did not leave an orphan"
        time.sleep(0.1)
    orphan = psutil.Process(int(orphan_pid.read_text()))
    assert orphan.pid not in {c.pid for c in psutil.Process(pid).children(recursive=True)}
    assert orphan in services.session_members(pid)
    stop_services(tmp_path)
    time.sleep(0.2)
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE


def test_a_reused_pid_is_not_taken_for_the_service(tmp_path):
    (tmp_path / ".tunepath" / "pids").mkdir(parents=True)
    # this test's own PID with a different start time: a PID the OS gave to another program since
    services.pid_file(tmp_path, "prefect").write_text(f"{os.getpid()}\n12345.0\n")
    assert running_pid(tmp_path, "prefect") is None
    assert stop_services(tmp_path)["prefect"] == "not running"


def test_busy_port_falls_back_to_a_free_one():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        chosen = services.choose_port("127.0.0.1", busy, "test")
        assert chosen != busy and services.port_free("127.0.0.1", chosen)


def test_env_file_points_the_cli_at_the_servers_while_they_run(tmp_path, monkeypatch):
    from tunepath.cli import prepare_env

    (tmp_path / ".tunepath").mkdir()
    services.write_env_file(tmp_path, "http://127.0.0.1:4999/api", "http://127.0.0.1:5999")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(services, "running_pid", lambda root, name: 4242)  # both servers alive
    prepare_env(tmp_path)
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4999/api"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def test_a_stale_env_file_is_ignored(tmp_path, monkeypatch):
    from tunepath.cli import prepare_env

    (tmp_path / ".tunepath").mkdir()
    services.write_env_file(tmp_path, "http://127.0.0.1:4999/api", "http://127.0.0.1:5999")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prepare_env(tmp_path)  # no pid files: the servers are gone
    assert "PREFECT_API_URL" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ


def test_prefect_yaml_deploys_both_flows_from_the_workers_project_folder():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == set(services.DEPLOYMENTS)
    for name, d in deployments.items():
        assert d["entrypoint"].split(":")[0] == services.DEPLOYMENTS[name]
        assert d["work_pool"]["name"] == ServiceOptions().pool
    step = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $TUNEPATH_PROJECT_DIR }}"
    # `tunepath up` deploys finetune with --concurrency-limit = the gpu slots (runs past the first go isolated)
    assert "concurrency_limit" not in deployments["finetune"]


def test_finetune_form_has_descriptions_bounds_and_params_yaml_defaults(tmp_path):
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    schema = parameter_schema(finetune).model_dump_for_openapi()
    train = schema["definitions"]["TrainConfig"]["properties"]["max_steps"]
    assert train["description"] and train["minimum"] == -1
    # the form's defaults are the project's params.yaml at `up` time, not the code's defaults
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^(  max_steps:) -?\d+", r"\1 7", text, count=1))
    defaults = services.deployment_parameters(tmp_path)["finetune"]["config"]
    assert defaults["train"]["max_steps"] == 7
    assert defaults["data"]["raw_dir"] == yaml.safe_load(text)["data"]["raw_dir"]


# ---------------------------------------------------------------- fast: infra/ for a team


def test_compose_binds_loopback_and_takes_every_secret_from_the_environment():
    text = (REPO / "infra" / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    example = (REPO / "infra" / ".env.example").read_text()
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|ACCESS_KEY", key):
                assert "${" in str(value), f"{name}.{key} is a literal: secrets come from infra/.env"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required and all(re.search(rf"^#?\s*{var}=", example, re.M) for var in required)
    assert compose["services"]["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${")
    assert "basic-auth" in compose["services"]["mlflow"]["command"]
    assert compose["services"]["prefect-server"]["environment"]["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] != "*"
    assert "## Authentication" in (REPO / "infra" / "README.md").read_text()
    gpu = compose["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_kubernetes_job_template_passes_prefect_validation_and_requests_gpus():
    from prefect.client.schemas.actions import WorkPoolCreate as ClientWorkPoolCreate
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / "infra" / "k8s" / "base-job-template.json").read_text())
    WorkPoolCreate(name="tunepath-k8s", type="kubernetes", base_job_template=template)  # every placeholder declared
    ClientWorkPoolCreate(name="tunepath-k8s", type="kubernetes", base_job_template=template)
    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v} | {"gpus": 2}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "tunepath-secrets"}}]


def asgi_status(app, headers: list[tuple[bytes, bytes]], kind: str = "http") -> object:
    """What an ASGI app answers to one request with `headers`: the HTTP status, or the WebSocket message type."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False} if kind == "http" else {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": kind, "method": "POST", "path": "/api/flows/", "headers": headers}, receive, send))
    return sent[0].get("status") or sent[0]["type"]


def test_the_local_guard_refuses_foreign_hosts_and_origins_and_lets_local_callers_through():
    from tunepath.localguard import LocalOnly, local_hosts

    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    hosts = local_hosts("127.0.0.1", 4200)
    assert hosts == ["127.0.0.1:4200", "localhost:4200", "[::1]:4200"]
    guard = LocalOnly(app, hosts)
    local = (b"host", b"127.0.0.1:4200")
    assert asgi_status(guard, [local]) == 200  # the worker, the CLI: no Origin
    assert asgi_status(guard, [(b"host", b"LOCALHOST:4200"), (b"origin", b"http://localhost:4200")]) == 200  # the UI
    assert asgi_status(guard, [local, (b"origin", b"http://evil.example")]) == 403
    assert asgi_status(guard, [local, (b"origin", b"null")]) == 403  # sandboxed frames, file:// pages
    assert asgi_status(guard, [local, (b"origin", b"http://127.0.0.1:8080")]) == 403  # another local site
    assert asgi_status(guard, [(b"host", b"evil.example:4200")]) == 403  # DNS rebinding
    assert asgi_status(guard, []) == 403
    assert asgi_status(guard, [local, (b"host", b"evil.example:4200")]) == 403
    assert asgi_status(guard, [local, (b"origin", b"http://evil.example")], "websocket") == "websocket.close"
    assert asgi_status(guard, [local, (b"origin", b"http://127.0.0.1:4200")], "websocket") == "websocket.accept"


def test_a_non_loopback_bind_also_answers_to_this_machines_names():
    import socket

    from tunepath.localguard import local_hosts

    hosts = local_hosts("0.0.0.0", 4200, ["ml.example.org", "ml.example.org:4200"])
    assert {"127.0.0.1:4200", f"{socket.gethostname()}:4200", "ml.example.org", "ml.example.org:4200"} <= set(hosts)
    assert "0.0.0.0:4200" not in hosts and "10.1.2.3:4200" in local_hosts("10.1.2.3", 4200)


# ---------------------------------------------------------------- services tier: real servers and a worker


@pytest.fixture(scope="module")
def live(tmp_path_factory, demo_assets):
    root = services_project(tmp_path_factory.mktemp("services") / "project", demo_assets, SERVICE_OVERRIDES)
    with running_services(root) as report:
        yield root, report


@pytest.mark.services
def test_up_prints_urls_writes_the_env_file_and_is_idempotent(live):
    root, report = live
    assert report.prefect_url.startswith("http://127.0.0.1:") and report.mlflow_url.startswith("http://127.0.0.1:")
    env = (root / ".tunepath" / "services.env").read_text()
    assert f"PREFECT_API_URL={report.prefect_url}/api" in env and f"MLFLOW_TRACKING_URI={report.mlflow_url}" in env
    again = start_services(root, ServiceOptions(prefect_port=0, mlflow_port=0))
    assert all(action.startswith("already running") for action in again.actions.values()), again.actions
    assert (again.prefect_url, again.mlflow_url) == (report.prefect_url, report.mlflow_url)
    assert again.seconds < 30


@pytest.mark.services
def test_gpu_limit_and_deployment_defaults(live):
    root, report = live
    api = f"{report.prefect_url}/api"
    status, limit = http("GET", f"{api}/v2/concurrency_limits/{services.GPU_LIMIT}")
    assert status == 200 and limit["limit"] >= 1 and limit["active"]
    _, dep = http("GET", f"{api}/deployments/name/finetune/finetune")
    from tunepath.config import Config
    from tunepath.params import load_config

    params = load_config(root / "params.yaml")
    assert dep["parameters"]["config"] == services.without_default_nulls(params)  # the nulls of plain inputs left out
    assert Config.model_validate(dep["parameters"]["config"]) == params
    # as many finetune runs at once as gpu slots: past the first, each works in a working copy of its own
    assert (dep.get("global_concurrency_limit") or {}).get("limit", dep.get("concurrency_limit")) == limit["limit"]
    assert "description" in dep["parameter_openapi_schema"]["definitions"]["TrainConfig"]["properties"]["max_steps"]


@pytest.mark.services
def test_finetune_deployment_run_registers_a_candidate_with_the_changed_parameter(live):
    from mlflow import MlflowClient

    root, report = live
    api = f"{report.prefect_url}/api"
    # more steps than the form's default: a changed value that must not make the evaluation gates harder to pass
    steps = changed_max_steps(root)
    run_id = run_like_ui(api, "finetune", lambda p: p["config"]["train"].update(max_steps=steps))
    run = wait_for_run(api, run_id)
    assert run["state"]["type"] == "COMPLETED", run_logs(api, run_id)
    # the changed value reached the stages, params.yaml (for dvc repro) and the MLflow run
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["max_steps"] == steps
    logged = [int(line.split(",")[0]) for line in (root / "artifacts/train/loss.csv").read_text().splitlines()[1:]]
    assert max(logged) == steps
    client = MlflowClient(tracking_uri=report.mlflow_url)
    version = client.get_model_version_by_alias("tunepath-demo", "candidate")
    assert client.get_run(version.run_id).data.params["train.max_steps"] == str(steps)
    record = json.loads((root / "artifacts/register/model.json").read_text())
    assert record["version"] == version.version and record["tracking_uri"] == report.mlflow_url
    _, artifacts = http("POST", f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    keys = {a["key"] for a in artifacts}
    assert {"tunepath-validate", "tunepath-tokenize", "tunepath-route", "tunepath-train", "tunepath-evaluate",
            "tunepath-register"} <= keys, keys
    link = [a for a in artifacts if a["key"] == "tunepath-mlflow-run"]  # on the flow run's own Artifacts tab
    # a link where the tracking URI is a server, else a note with the run id and how to open it (flows/finetune.show_run)
    assert len(link) == 1 and link[0]["task_run_id"] is None and link[0]["type"] in ("link", "markdown"), link
    assert version.run_id in link[0]["data"], link[0]["data"]
    FINISHED["finetune"] = run_id


@pytest.mark.services
def test_train_task_takes_a_gpu_slot(live):
    _, report = live
    if "finetune" not in FINISHED:
        pytest.skip("needs the finetune run of the test above")
    api, run_id = f"{report.prefect_url}/api", FINISHED["finetune"]
    query = {"filter": {"event": {"prefix": ["prefect.concurrency-limit.acquired"]},
                        "related": {"resources_in_roles": [[f"prefect.flow-run.{run_id}", "flow-run"]]}}, "limit": 50}
    _, events = http("POST", f"{api}/events/filter", query)
    names = {e["resource"].get("prefect.resource.name") for e in events.get("events", [])}
    assert services.GPU_LIMIT in names, f"the train task of flow run {run_id} took no `gpu` slot (limits taken: {names})"


@pytest.mark.services
def test_promote_deployment_moves_champion_to_the_candidate(live):
    from mlflow import MlflowClient

    root, report = live
    if not (root / "flows" / "promote.py").exists():
        pytest.skip("flows/promote.py is not in the repository yet; the promote deployment is registered once it is")
    api = f"{report.prefect_url}/api"
    run = wait_for_run(api, run_like_ui(api, "promote"))
    assert run["state"]["type"] == "COMPLETED", run_logs(api, run["id"])
    client = MlflowClient(tracking_uri=report.mlflow_url)
    champion = client.get_model_version_by_alias("tunepath-demo", "champion")
    assert champion.version == client.get_model_version_by_alias("tunepath-demo", "candidate").version


@pytest.mark.services
def test_cli_and_dvc_stages_report_to_the_running_servers(live):
    """`tunepath run` and `tunepath stage` (what dvc repro calls) find the servers through .tunepath/services.env."""
    root, report = live
    api = f"{report.prefect_url}/api"
    query = {"flow_runs": {"deployment_id": {"is_null_": True}}, "flows": {"name": {"any_": ["finetune"]}}}
    before = http("POST", f"{api}/flow_runs/count", query)[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    for argv in (["run"], ["stage", "register"]):
        done = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(root), *argv], cwd=root, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    assert http("POST", f"{api}/flow_runs/count", query)[1] == before + 1
    record = json.loads((root / "artifacts/register/model.json").read_text())
    assert record["tracking_uri"] == report.mlflow_url


def request_status(url: str, method: str = "GET", headers: dict | None = None, body: dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


@pytest.mark.services
def test_both_servers_refuse_foreign_origins_and_hosts_and_serve_their_own_pages(live):
    """The probe of the issue: a page on another origin POSTs to the local servers (Prefect answered it, with
    `Access-Control-Allow-Origin: *`); a rebound DNS name reaches them with its own Host header."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    _, report = live
    evil = {"Origin": "http://evil.example"}
    checks = {  # a state-changing request each server has, and a read
        "prefect": (report.prefect_url, f"{report.prefect_url}/api/flows/", {"name": "from-a-web-page"}, f"{report.prefect_url}/api/flows/filter"),
        "mlflow": (report.mlflow_url, f"{report.mlflow_url}/api/2.0/mlflow/experiments/create", {"name": "from-a-web-page"},
                   f"{report.mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"),
    }
    for name, (own, write, body, read) in checks.items():
        foreign_host = {"Host": "evil.example:" + own.rsplit(":", 1)[1]}
        assert request_status(write, "POST", evil, body)[0] == 403, name
        assert request_status(read, "POST" if name == "prefect" else "GET", foreign_host, {} if name == "prefect" else None)[0] == 403, name
        status, headers = request_status(read, "POST" if name == "prefect" else "GET", {"Origin": own}, {} if name == "prefect" else None)
        assert status == 200, name
        assert headers.get("access-control-allow-origin", own) in (own, None), (name, headers)
    assert request_status(checks["prefect"][3], "POST", {}, {"flows": {"name": {"any_": ["from-a-web-page"]}}})[0] == 200
    _, flows = http("POST", f"{report.prefect_url}/api/flows/filter", {"flows": {"name": {"any_": ["from-a-web-page"]}}})
    assert flows == []  # the refused POST created nothing
    _, found = http("GET", f"{report.mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=from-a-web-page")
    assert "experiment" not in found
    ws = report.prefect_url.replace("http://", "ws://") + "/api/events/out"
    with pytest.raises(InvalidStatus, match="403"):
        connect(ws, origin="http://evil.example", open_timeout=10).close()
    assert services.healthy(f"{report.prefect_url}/api/health") and services.healthy(f"{report.mlflow_url}/health")


# Last: it stops the servers every test above shares.
@pytest.mark.services
def test_down_stops_every_process_up_started(live):
    import psutil

    root, report = live
    pids = process_tree(root)
    assert len(pids) >= 3
    stop_services(root)
    time.sleep(0.5)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after down: {alive}"
    assert not (root / ".tunepath" / "services.env").exists()
    assert not services.healthy(f"{report.prefect_url}/api/health")
