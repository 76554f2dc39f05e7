"""What DVC costs on a big data folder: `dvc add` time, a no-change `dvc status`, and the disk the cache adds.

Usage:

    python -m benchmarks.dvc_cache --gb 2            # 2 GB of JSONL in 16 files, both cache types
    python -m benchmarks.dvc_cache --gb 5 --workdir /big/disk

For each cache type (DVC's default `reflink,copy`, `reflink,hardlink,symlink,copy` and `hardlink,copy`) a fresh git + DVC
repository gets the same generated folder, then: `dvc add` of it (hashing and the cache copy or link), `dvc
status` right after (served by DVC's file-state cache, no rehash), `dvc add` again with nothing changed, and
then `dvc repro` of a stage whose output is a copy of the folder (and again, with nothing changed), and
the disk of the workspace plus `.dvc/cache` counted by inode (a hard link counts once). Also says whether a
workspace file is writable (DVC makes linked files read-only: editing one in place would change the cache;
root ignores the mode, so for root such an edit corrupts the cache silently). Figures as JSON to
benchmarks/results/ (unless --out says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("reflink,copy", "reflink,hardlink,symlink,copy", "hardlink,copy")


def _disk(root: Path) -> int:
    seen, total = set(), 0
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _write(folder: Path, size: int, files: int) -> None:
    folder.mkdir(parents=True)
    line = (json.dumps({"messages": [{"role": "user", "content": "question " * 20},
                                     {"role": "assistant", "content": "answer " * 60}]}) + "\n").encode()
    block = line * max(1, (1 << 20) // len(line))
    per_file = size // files
    for i in range(files):
        with open(folder / f"part-{i:03d}.jsonl", "wb") as f:
            written = 0
            while written < per_file:
                f.write(block)
                written += len(block)
            f.write(b'{"n": %d}\n' % i)  # files differ, so none is deduplicated


def _timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return round(time.perf_counter() - started, 2)


def measure(work: Path, cache_type: str, size: int, files: int) -> dict:
    repo = work / cache_type.replace(",", "-")
    repo.mkdir(parents=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "config", "core.analytics", "false"], cwd=repo, check=True)
    subprocess.run([*dvc, "config", "cache.type", cache_type], cwd=repo, check=True)
    _write(repo / "data" / "raw", size, files)
    before = _disk(repo)
    result = {"cache_type": cache_type, "data_gb": round(size / (1 << 30), 2), "files": files,
              "load_average": round(os.getloadavg()[0], 2)}
    result["add_s"] = _timed([*dvc, "add", "-q", "data/raw"], repo)
    result["status_s"] = _timed([*dvc, "status", "-q"], repo)
    result["add_again_s"] = _timed([*dvc, "add", "-q", "data/raw"], repo)
    result["added_disk_gb"] = round((_disk(repo) - before) / (1 << 30), 3)
    # a stage whose output is as big as its input: `dvc repro` hashes and caches the output
    # (one line more in each file: an output equal to its input would already be in the cache)
    copy = "mkdir -p data/copied && for f in data/raw/*; do (cat $f; echo) > data/copied/$(basename $f); done"
    (repo / "dvc.yaml").write_text(f"stages:\n  copy:\n    cmd: {json.dumps(copy)}\n    deps: [data/raw]\n"
                                   "    outs: [data/copied]\n", encoding="utf-8")
    before = _disk(repo)
    result["repro_s"] = _timed([*dvc, "repro", "-q"], repo)
    result["repro_disk_gb"] = round((_disk(repo) - before) / (1 << 30), 3)  # the output and what its cache adds
    result["repro_again_s"] = _timed([*dvc, "repro", "-q"], repo)
    part = repo / "data" / "raw" / "part-000.jsonl"
    result["link"] = "hardlink" if part.stat().st_nlink > 1 else "symlink" if part.is_symlink() else "copy"
    result["writable"] = bool(part.stat().st_mode & 0o222)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--workdir", help="folder for the repositories (default: a temporary one; needs ~3x --gb)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/dvc_cache_<date>.json)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tunepath-bench-dvc-"))
    size = int(args.gb * (1 << 30))
    results = []
    for cache_type in TYPES:
        results.append(measure(work, cache_type, size, args.files))
        print(json.dumps(results[-1]), flush=True)
        subprocess.run(["rm", "-rf", str(work / cache_type.replace(",", "-"))], check=True)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"dvc_cache_{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(),
                               "command": f"python -m benchmarks.dvc_cache --gb {args.gb:g} --files {args.files}",
                               "results": results}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
