"""A real `tunepath run` on a disk that fills up half-way: one line that says so and names the file.

The project sits on a 14 MB tmpfs mounted in a private mount namespace (`unshare -rm`: no root needed where
unprivileged user namespaces are allowed); it fits the inputs and the first stages, not the merged model and its
copies in the DVC cache and MLflow. Skipped where no such namespace can be made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_OVERRIDES, REPO, make_project

pytestmark = pytest.mark.slow  # a whole run up to the stage that fills the disk

SIZE = "14m"


def namespaces_work(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    point = tmp_path / "probe"
    point.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {point}"], capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_ends_in_one_line_naming_the_cause(tmp_path, demo_assets):
    if not namespaces_work(tmp_path):
        pytest.skip("no private mount namespace here (unshare -rm): cannot make a small disk without root")
    source = make_project(tmp_path / "source", demo_assets)
    disk = tmp_path / "disk"
    disk.mkdir()
    sets = " ".join(f"--set {o}" for o in [*FAST_OVERRIDES, "train.max_steps=10"])
    script = (f'mount -t tmpfs -o size={SIZE} tmpfs "$1" && cp -a "$2/." "$1/" && '
              f'exec "{sys.executable}" -m tunepath.cli --project "$1" run {sets}')
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), str(source)], cwd=REPO, capture_output=True,
                         text=True, timeout=1500, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tunepath: error: ") and "No space left on device" in last, out.stderr[-4000:]
    assert str(disk) in last, last  # names where: the file or folder on the full disk
