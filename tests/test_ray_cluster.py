"""`tunepath stage validate` and `tokenize` pointed at a running Ray cluster, as a team runs them past one machine.

The cluster is started the way infra/compose.yaml starts its nodes (`ray start --head`, then `ray start --address`
per worker node, token authentication on), here three nodes of one CPU each on this machine. The stages reach it
through Ray Client (`ray://`), read params.yaml like any stage command, run one actor per CPU of the cluster (3,
more than the driver's cores on a 2-core machine) and must write the bytes the local engine writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from test_ray_engine import _files, _free_port

from tests.conftest import make_project

pytestmark = pytest.mark.slow
NODES = 3


def _stop_cluster(temp: Path, port: int) -> None:
    """What the cluster started: processes naming its folder or its GCS port, and their children (Ray's agents,
    whose titles Ray rewrites and whose environment names neither, so conftest's `stop_strays` does not find them).
    Not `ray stop`, which stops every Ray instance of this user on the machine."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if str(temp) in line or re.search(rf":{port}\b", line):
            with contextlib.suppress(psutil.Error):
                found.update([proc, *proc.children(recursive=True)])
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(found), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@contextlib.contextmanager
def ray_cluster(nodes: int):
    """A head and `nodes - 1` worker nodes, one CPU each; yields (environment for its clients, Ray Client address)."""
    temp = Path(tempfile.mkdtemp(prefix="tp-ray-"))  # short: Ray's socket paths live under it (107 characters at most)
    port, client = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_urlsafe(32), "RAY_USAGE_STATS_ENABLED": "0",
           # the head's Ray Client proxy starts a server per client and gives it 30 s: not enough on a loaded 2-core CI machine
           "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "300"}
    ray = str(Path(sys.executable).with_name("ray"))
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", f"--ray-client-server-port={client}", "--include-dashboard=false",
                        f"--temp-dir={temp}", *common], env=env, check=True, capture_output=True, timeout=300)
        for _ in range(nodes - 1):
            subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True, capture_output=True, timeout=300)
        yield env, f"ray://127.0.0.1:{client}"
    finally:
        _stop_cluster(temp, port)
        shutil.rmtree(temp, ignore_errors=True)


def _set(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _stage(project: Path, name: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(project), "stage", name],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)


def _passed(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"{' '.join(out.args[-2:])}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _outputs(project: Path) -> tuple[dict, dict]:
    """Both stages' files, the report's worker count aside (the engines ran different counts, on purpose)."""
    validate = _files(project / "artifacts" / "validate")
    report = json.loads(validate["report.json"])
    report["streaming"].pop("workers")
    validate["report.json"] = json.dumps(report, sort_keys=True).encode()
    return validate, _files(project / "artifacts" / "tokenize")


def test_the_stage_commands_on_a_ray_cluster_write_the_local_bytes(tmp_path, demo_assets):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    project = make_project(tmp_path / "project", demo_assets)
    chats = project / "data" / "raw" / "chat.jsonl"  # in four files: validate cuts a chunk per file at least
    lines = chats.read_text(encoding="utf-8").splitlines(keepends=True)
    for i in range(4):
        (chats.parent / f"chat-{i}.jsonl").write_text("".join(lines[i::4]), encoding="utf-8")
    chats.unlink()
    cache = tmp_path / "cache"  # one folder, emptied between the runs: its path is part of what the outputs hash
    _set(project, "tokenize", cache_dir=str(cache))

    _set(project, "data", engine="local", num_proc=2)
    for name in ("validate", "tokenize"):
        _passed(_stage(project, name, dict(os.environ)))
    local = _outputs(project)
    shutil.rmtree(project / "artifacts")
    shutil.rmtree(cache)

    with ray_cluster(NODES) as (env, address):
        _set(project, "data", engine="ray", ray_address=address, num_proc=None)
        logs = [_passed(_stage(project, name, env)).stderr for name in ("validate", "tokenize")]
        assert all(f"data engine ray: {address}, {NODES} node(s), {NODES} CPUs" in log for log in logs), logs
        report = json.loads((project / "artifacts" / "validate" / "report.json").read_text())
        assert report["streaming"]["chunks"] >= 6 and report["streaming"]["workers"] == NODES  # one actor per node
        clustered = _outputs(project)
        wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_urlsafe(32)}  # a client without the cluster's token gets nothing run
        refused = _stage(project, "validate", wrong)
        assert refused.returncode != 0 and f"data.ray_address {address!r}" in refused.stderr, refused.stderr[-2000:]

    for stage, (theirs, ours) in zip(("validate", "tokenize"), zip(local, clustered)):
        assert sorted(ours) == sorted(theirs), f"{stage}: other files on the cluster"
        for name in theirs:
            assert ours[name] == theirs[name], f"{stage}/{name} differs between the local engine and the cluster"
