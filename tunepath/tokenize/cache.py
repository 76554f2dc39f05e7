"""The tokenize cache's size bound: least recently used entries go first once the cache is past it.

An entry is one folder the stage reads back whole: a shard's map output (`<key>/`), a finished output
(`finished/<key>/`) or the per-split records of one input (`records/<fingerprint>/`). Using an entry sets its
folder's modification time (access times are unreliable: most file systems are mounted relatime or noatime),
so the time order is the use order. Eviction never takes an entry this run used, nor one used in the last
`GRACE_S` by a run beside this one, and moves the folder aside before deleting it, so a reader sees an entry
whole or not at all. Finished outputs are hard links of the stage's outputs: evicting one frees only what the
outputs no longer hold, and the size counts each file once, by inode.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GRACE_S = 15 * 60  # a concurrent run's entries read since then are kept even past the bound
_KEY = re.compile(r"[0-9a-f]{32}")


def touch(path: Path) -> None:
    """Mark an entry used now."""
    try:
        os.utime(path)
    except OSError:  # gone (evicted beside this run): the caller tokenizes again
        pass


def entries(root: Path) -> list[Path]:
    found = []
    for folder in (root, root / "finished", root / "records"):
        try:
            with os.scandir(folder) as it:
                found += [Path(e.path) for e in it if e.is_dir(follow_symlinks=False) and _KEY.fullmatch(e.name)]
        except OSError:
            continue
    return found


def _size(path: Path, seen: set) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(folder, name), follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


@dataclass
class Eviction:
    entries: int
    size: int  # bytes before eviction
    evicted: int
    freed: int
    kept_over: bool  # still past the bound: what this run (or one beside it) uses is larger than the bound


def evict(root: Path, max_bytes: int, keep: set[Path], now: float | None = None) -> Eviction:
    """Delete least recently used entries under `root` until it holds at most `max_bytes`; `keep`: this run's."""
    now = time.time() if now is None else now
    seen: set = set()
    sized = []
    for path in entries(root):
        try:
            used = path.stat().st_mtime
        except OSError:
            continue
        sized.append((used, path, _size(path, seen)))
    total = sum(size for _, _, size in sized)
    result = Eviction(len(sized), total, 0, 0, False)
    kept = {p.resolve() for p in keep}
    for used, path, size in sorted(sized, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if path.resolve() in kept or used > now - GRACE_S:
            continue
        aside = path.with_name(f"{path.name}.evicted-{os.getpid()}")
        try:
            os.replace(path, aside)
        except OSError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
        total -= size
        result.evicted += 1
        result.freed += size
    result.kept_over = total > max_bytes
    return result


def bound(root: Path, max_gb: float | None, keep: set[Path]) -> Eviction | None:
    """Apply tokenize.cache_max_gb after a run, with one log line when anything was evicted or could not be."""
    if max_gb is None:
        return None
    result = evict(root, int(max_gb * (1 << 30)), keep)
    if result.evicted:
        log.info("tokenize: cache %.2f GB over its bound of %.2f GB (tokenize.cache_max_gb): evicted %d of %d entries, "
                 "least recently used first, freeing %.2f GB", result.size / (1 << 30), max_gb, result.evicted,
                 result.entries, result.freed / (1 << 30))
    if result.kept_over:
        log.warning("tokenize: the cache stays over tokenize.cache_max_gb (%.2f GB): the entries this run or one "
                    "started in the last %d minutes uses are larger than that; raise the bound", max_gb, GRACE_S // 60)
    return result
