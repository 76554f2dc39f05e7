"""The project's own services on loopback: a Prefect server, an MLflow server, a process worker and the deployments.

    tunepath up       # start what is not running, create the `gpu` limit, register the deployments, print the URLs
    tunepath status   # each service: running or not, PID, URL, log file
    tunepath down     # stop exactly the processes `up` started (and the flow runs their worker started)

Everything lives in `.tunepath/` in the project: `pids/`, `logs/`, `services.json` (host, ports, URLs) and
`services.env`, the KEY=VALUE file the CLI reads so that `tunepath run` and `dvc repro` report to these servers.
Prefect keeps its SQLite database in the project's PREFECT_HOME (`.prefect/`), MLflow in `mlflow.db` with artifacts
in `mlartifacts/`: the same stores `tunepath run` uses when no server is up, so earlier runs show in the UIs too.

This module talks to Prefect and MLflow only through their CLIs and HTTP APIs (no Prefect import in the core).
Both servers answer only their own loopback names as Host and their own pages as Origin (`tunepath.localguard`):
a web page open in the user's browser cannot drive them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tunepath.errors import StageError
from tunepath.localguard import local_hosts, origins_of
from tunepath.offline import OFFLINE_ENV

log = logging.getLogger(__name__)

STATE_DIR = ".tunepath"
SERVICES = ("prefect", "mlflow", "worker")
DEPLOYMENTS = {"finetune": "flows/finetune.py", "promote": "flows/promote.py"}
GPU_LIMIT = "gpu"
# Offline and quiet: no telemetry from any of the tools the services run.
QUIET_ENV = {
    **OFFLINE_ENV,
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tunepath",
    # the job runner would start a second process pool inside the server; tunepath has no MLflow jobs
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


class ServiceError(StageError):
    """A service did not start or stop; the message says which one, why, and where its log is."""


@dataclass(frozen=True)
class ServiceOptions:
    """How `tunepath up` starts the services. Port 0 picks a free port; a busy port falls back to a free one."""

    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = "tunepath"
    gpu_slots: int | None = None  # None: one per CUDA card found by nvidia-smi, at least 1
    deploy: bool = True
    timeout_s: float = 180.0
    allowed_hosts: tuple[str, ...] = ()  # names besides loopback (and, off loopback, this machine's) both servers answer to


@dataclass
class Report:
    """What `start_services` did: per service 'started' or 'already running', and the URLs."""

    actions: dict[str, str] = field(default_factory=dict)
    prefect_url: str = ""
    mlflow_url: str = ""
    deployments: list[str] = field(default_factory=list)
    gpu_slots: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------- state files


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def pid_file(root: Path, name: str) -> Path:
    return state_dir(root) / "pids" / f"{name}.pid"


def log_file(root: Path, name: str) -> Path:
    return state_dir(root) / "logs" / f"{name}.log"


def read_state(root: Path) -> dict:
    path = state_dir(root) / "services.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_state(root: Path, state: dict) -> None:
    (state_dir(root) / "services.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def write_env_file(root: Path, prefect_api: str, mlflow_url: str) -> Path:
    """The file the CLI loads (`prepare_env`): URLs only, never a secret."""
    path = state_dir(root) / "services.env"
    path.write_text(
        "# written by `tunepath up`; removed by `tunepath down`. The tunepath CLI (and so dvc repro) reads it.\n"
        f"PREFECT_API_URL={prefect_api}\nMLFLOW_TRACKING_URI={mlflow_url}\n",
        encoding="utf-8",
    )
    return path


def live_env(root: Path) -> dict[str, str]:
    """services.env's values while both servers still run; {} (with a warning) when the file outlived them."""
    path = state_dir(root) / "services.env"
    if not path.exists():
        return {}
    if not (running_pid(root, "prefect") and running_pid(root, "mlflow")):
        log.warning("%s is stale: the servers `tunepath up` started are not running; ignoring it "
                    "(run `make up` to start them or `make down` to clear it)", path)
        return {}
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            env[key.strip()] = value.strip()
    return env


def running_pid(root: Path, name: str) -> int | None:
    """The PID of a service this project started, if that very process still runs (PIDs get reused)."""
    import psutil

    path = pid_file(root, name)
    if not path.exists():
        return None
    try:
        fields = path.read_text(encoding="utf-8").split()
        pid, started = int(fields[0]), float(fields[1])
        proc = psutil.Process(pid)
        if len(fields) > 2 and start_ticks(pid) is not None:
            same = start_ticks(pid) == fields[2]
        else:  # a pid file of an older tunepath, or no /proc: the wall-clock start, which can step by a second
            same = abs(proc.create_time() - started) < 2.0
        if same and proc.status() != psutil.STATUS_ZOMBIE:
            return proc.pid
    except (ValueError, IndexError, psutil.Error):
        pass
    return None


def start_ticks(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat, field 22); None without /proc.

    Not psutil's create_time: that adds the boot time from /proc/stat, a whole second that moves by one when
    the clock is adjusted, so a service checked later looked like another process with its PID and was left
    running by `down`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()[19].decode()


# ---------------------------------------------------------------- processes


def tool(name: str) -> str:
    """The `prefect`/`mlflow` script of the interpreter running tunepath (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found next to {sys.executable} or on PATH; install tunepath's dependencies (make install)")
    return found


def service_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["PREFECT_HOME"] = str(root / ".prefect")
    env.update(extra or {})
    return env


def spawn(root: Path, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start a service in its own session (so `down` can stop it and its children), logging to logs/NAME.log."""
    import psutil

    log_path = log_file(root, name)
    with open(log_path, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv[:4])} ...\n".encode())
        proc = subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pid_file(root, name).write_text(f"{proc.pid}\n{psutil.Process(proc.pid).create_time()}\n{start_ticks(proc.pid) or ''}\n",
                                    encoding="utf-8")
    return proc.pid


def stop_pid(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the process and every descendant (uvicorn workers, flow runs), SIGKILL what is left after grace_s.

    A service runs in a session of its own (`spawn`): what is still in that session goes too, also a process
    whose parent died before it (orphans are handed to init, so they are nobody's descendants)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent] + parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    try:
        leads = os.getsid(pid) == pid
    except OSError:
        leads = False
    procs += [p for p in session_members(pid) if p.pid not in {q.pid for q in procs}] if leads else []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    late = [p for p in session_members(pid) if p.pid not in {q.pid for q in procs}] if leads else []  # started meanwhile
    for p in alive + late:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive + late, timeout=5)


def session_members(sid: int) -> list:
    """Every process of session `sid` except its leader; found also after the leader has exited."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != sid and os.getsid(p.pid) == sid:
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------- network


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers do: a port whose last connections linger in TIME_WAIT (right after `down`) is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def choose_port(host: str, wanted: int, what: str) -> int:
    if wanted and port_free(host, wanted):
        return wanted
    port = free_port(host)
    if wanted:
        log.warning("%s: port %d on %s is busy; using %d instead", what, wanted, host, port)
    return port


def url_host(host: str) -> str:
    """The address clients use: a server bound to every interface is still reached on loopback from here."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host in ("::", "::1") else host)


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, object]:
    """One JSON request with the standard library; returns (status, parsed body or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def healthy(url: str) -> bool:
    try:
        return http("GET", url, timeout=2.0)[0] == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_until(check, what: str, root: Path, name: str, timeout_s: float) -> None:
    """Poll `check()` until true; fail early with the log tail if the service's process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if running_pid(root, name) is None:
            raise ServiceError(f"{what} exited while starting; last lines of {log_file(root, name)}:\n{log_tail(log_file(root, name))}")
        time.sleep(0.5)
    raise ServiceError(f"{what} not ready after {timeout_s:.0f} s; see {log_file(root, name)}:\n{log_tail(log_file(root, name))}")


# ---------------------------------------------------------------- the services


def start_services(root: Path, options: ServiceOptions = ServiceOptions()) -> Report:
    """Start whatever is not running yet; idempotent. Returns what it did and the two URLs."""
    t0 = time.monotonic()
    root = root.resolve()
    for sub in ("pids", "logs"):
        (state_dir(root) / sub).mkdir(parents=True, exist_ok=True)
    if options.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: these local servers have no authentication; for a shared setup use infra/ "
                    "(Prefect API auth string, MLflow basic auth)", options.host)
    previous, report = read_state(root), Report()
    host = options.host
    ports = {}
    for name, wanted in (("prefect", options.prefect_port), ("mlflow", options.mlflow_port)):
        pid = running_pid(root, name)
        if pid and previous.get("host") == host and previous.get(f"{name}_port"):
            ports[name] = previous[f"{name}_port"]
            report.actions[name] = f"already running (pid {pid})"
        else:
            if pid:  # running with other settings: restart it with these
                stop_pid(pid)
            ports[name] = choose_port(host, wanted, name)
            report.actions[name] = "started"
    prefect_url = f"http://{url_host(host)}:{ports['prefect']}"
    mlflow_url = f"http://{url_host(host)}:{ports['mlflow']}"
    report.prefect_url, report.mlflow_url = prefect_url, mlflow_url
    env = service_env(root)

    if report.actions["prefect"] == "started":
        # the UI asks /ui-settings for its API address, derived from these settings, not from --host/--port
        server_env = service_env(root, {"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(ports["prefect"]),
                                        "PREFECT_UI_API_URL": f"{prefect_url}/api", "PREFECT_API_URL": f"{prefect_url}/api"})
        # Prefect's app behind a Host/Origin guard (flows/server.py): Prefect itself answers any Host and Origin
        extra = [a for h in options.allowed_hosts for a in ("--allowed-host", h)]
        spawn(root, "prefect", [sys.executable, "-m", "flows.server", "--host", host, "--port", str(ports["prefect"]), *extra], server_env)
    if report.actions["mlflow"] == "started":
        (root / "mlartifacts").mkdir(exist_ok=True)
        # MLflow's own guard, narrowed to this server's names (its default also admits private-network addresses)
        mlflow_hosts = local_hosts(host, ports["mlflow"], options.allowed_hosts)
        spawn(root, "mlflow", [tool("mlflow"), "server", "--host", host, "--port", str(ports["mlflow"]), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", (root / "mlartifacts").as_uri(),
                               "--allowed-hosts", ",".join(mlflow_hosts), "--cors-allowed-origins", ",".join(origins_of(mlflow_hosts))], env)
    state = {"host": host, "prefect_port": ports["prefect"], "mlflow_port": ports["mlflow"], "pool": options.pool,
             "prefect_url": prefect_url, "mlflow_url": mlflow_url}
    write_state(root, state)
    wait_until(lambda: healthy(f"{prefect_url}/api/health"), f"Prefect server ({prefect_url})", root, "prefect", options.timeout_s)
    wait_until(lambda: healthy(f"{mlflow_url}/health"), f"MLflow server ({mlflow_url})", root, "mlflow", options.timeout_s)
    write_env_file(root, f"{prefect_url}/api", mlflow_url)

    api = f"{prefect_url}/api"
    run_env = service_env(root, {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url,
                                 "TUNEPATH_PROJECT_DIR": str(root), "PREFECT_LOGGING_LEVEL": flow_run_log_level()})
    pid = running_pid(root, "worker")
    if pid and report.actions["prefect"] != "started" and previous.get("pool") == options.pool:
        report.actions["worker"] = f"already running (pid {pid})"
    else:
        if pid:
            stop_pid(pid)
        spawn(root, "worker", [tool("prefect"), "worker", "start", "--pool", options.pool, "--type", "process",
                               "--name", f"tunepath-{socket.gethostname()}"], run_env)
        report.actions["worker"] = "started"
    wait_until(lambda: worker_online(api, options.pool), f"Prefect worker (pool {options.pool})", root, "worker", options.timeout_s)

    report.gpu_slots = options.gpu_slots or count_gpus()
    ensure_limit(api, GPU_LIMIT, report.gpu_slots)
    if options.deploy:
        report.deployments = register_deployments(root, api, run_env, options.timeout_s, slots=report.gpu_slots)
    report.seconds = time.monotonic() - t0
    return report


def flow_run_log_level() -> str:
    """What the worker's flow runs log: at least INFO, the level of every line a run's Logs tab shows (stages,
    working copies). A quieter PREFECT_LOGGING_LEVEL set for a terminal (the test suite sets WARNING) would leave
    that tab empty; DEBUG stays DEBUG."""
    level = os.environ.get("PREFECT_LOGGING_LEVEL", "INFO").upper()
    return level if level in ("DEBUG", "INFO") else "INFO"


def worker_online(api: str, pool: str) -> bool:
    try:
        status, workers = http("POST", f"{api}/work_pools/{pool}/workers/filter", {})
    except (OSError, urllib.error.URLError):
        return False
    return status == 200 and any(w.get("status") == "ONLINE" for w in workers)


def count_gpus() -> int:
    """One `gpu` slot per CUDA card (nvidia-smi, no torch import); 1 on a machine without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 1
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))


def ensure_limit(api: str, name: str, limit: int) -> None:
    """Create or resize the global concurrency limit the train task takes."""
    status, body = http("GET", f"{api}/v2/concurrency_limits/{name}")
    if status == 404:
        status, body = http("POST", f"{api}/v2/concurrency_limits/", {"name": name, "limit": limit, "active": True})
    elif status == 200 and (body.get("limit") != limit or not body.get("active")):
        status, body = http("PATCH", f"{api}/v2/concurrency_limits/{name}", {"limit": limit, "active": True})
    if status not in (200, 201, 204):
        raise ServiceError(f"could not create the global concurrency limit {name!r} (HTTP {status}): {body}")


def deployment_parameters(root: Path) -> dict[str, dict]:
    """Each deployment's default parameters: `finetune` shows params.yaml as its form's defaults."""
    from tunepath.params import load_config

    config = load_config(root / "params.yaml")
    return {"finetune": {"config": without_default_nulls(config)}, "promote": {}}


def without_default_nulls(model) -> dict:
    """`model` as JSON without the nulls of fields whose default is null. The form draws an optional text or
    number as one plain input (tunepath.form), and Prefect checks a deployment's parameters with no null allowed
    there (its flow-run check allows it); a key left out validates to that same null."""
    from pydantic import BaseModel

    out = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = without_default_nulls(value)
        elif value is not None or field.default is not None:
            out[name] = model.__pydantic_serializer__.to_python(model, mode="json", include={name})[name]
    return out


def register_deployments(root: Path, api: str, env: dict[str, str], timeout_s: float, slots: int = 1) -> list[str]:
    """`prefect deploy` each deployment of prefect.yaml whose flow file exists, when it or params.yaml changed.

    `finetune` may run `slots` flow runs at once (one per GPU slot): the first works in the project folder, the
    others each in a working copy of their own (tunepath.isolate); the `gpu` limit still admits one training per card."""
    if not (root / "prefect.yaml").exists():
        raise ServiceError(f"{root / 'prefect.yaml'} not found; the deployments are defined there")
    params = deployment_parameters(root)
    recorded_path = state_dir(root) / "deployed.json"
    recorded = json.loads(recorded_path.read_text(encoding="utf-8")) if recorded_path.exists() else {}
    names, jobs = [], {}
    for name, source in DEPLOYMENTS.items():
        if not (root / source).exists():
            log.warning("deployment %s skipped: %s does not exist yet", name, source)
            continue
        names.append(name)
        limit = ["--concurrency-limit", str(max(1, slots))] if name == "finetune" else []
        digest = fingerprint(root, source, {**params[name], "_limit": limit})
        exists = http("GET", f"{api}/deployments/name/{name}/{name}")[0] == 200
        if exists and recorded.get(name) == digest:
            continue
        argv = [tool("prefect"), "--no-prompt", "deploy", "--name", name, "--params", json.dumps(params[name]), *limit]
        with open(log_file(root, "deploy"), "ab") as out:
            jobs[name] = (digest, subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                   stderr=subprocess.STDOUT))
    for name, (digest, proc) in jobs.items():
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -1
        if code != 0:
            raise ServiceError(f"`prefect deploy --name {name}` failed; see {log_file(root, 'deploy')}:\n{log_tail(log_file(root, 'deploy'))}")
        recorded[name] = digest
    recorded_path.write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")
    return names


def fingerprint(root: Path, source: str, params: dict) -> str:
    h = hashlib.sha256()
    for path in (root / "prefect.yaml", root / source):
        h.update(path.read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def stop_services(root: Path) -> dict[str, str]:
    """Stop the worker, then the servers, that this project's `up` started; remove services.env. Idempotent."""
    root = root.resolve()
    done = {}
    for name in reversed(SERVICES):
        pid = running_pid(root, name)
        if pid:
            stop_pid(pid)
            done[name] = f"stopped (pid {pid})"
        else:
            done[name] = "not running"
        pid_file(root, name).unlink(missing_ok=True)
    (state_dir(root) / "services.env").unlink(missing_ok=True)
    return done


def service_status(root: Path) -> dict[str, dict]:
    """Per service: running, pid, url (servers), healthy (servers), log."""
    root = root.resolve()
    state = read_state(root)
    out = {}
    for name in SERVICES:
        pid = running_pid(root, name)
        entry = {"running": pid is not None, "pid": pid, "log": str(log_file(root, name))}
        if name in ("prefect", "mlflow") and state.get(f"{name}_url"):
            entry["url"] = state[f"{name}_url"]
            health = f"{entry['url']}/api/health" if name == "prefect" else f"{entry['url']}/health"
            entry["healthy"] = pid is not None and healthy(health)
        out[name] = entry
    return out
