"""Offline benchmarks through lm-evaluation-harness: every folder in `evaluate.benchmarks` is a task folder (task
YAML files and the local data they name, paths relative to the folder), loaded with `TaskManager(include_path=...)`
and run for the base and the tuned model. Nothing is downloaded: the data are local files, the models in memory.

Each task's main metric (the first in its metric_list) is compared base against tuned; the regression gate bounds
the drop: accuracy-like metrics may fall at most `max_benchmark_drop` (absolute), perplexity-like ones rise at most
that share (relative).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class BenchmarkError(ValueError):
    """A folder in evaluate.benchmarks is not a usable lm-eval task folder."""


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """lm-eval hands data_files to `datasets`, which resolves relative paths against the working directory."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def task_names(folder: Path) -> dict[str, str | None]:
    """{task name: its main metric (the first of its metric_list)} for the folder's YAML files, checked by lm-eval's
    own task index."""
    import yaml

    if not folder.is_dir():
        raise BenchmarkError(f"evaluate.benchmarks: {folder} is not a folder; give lm-eval task folders (task YAML + local data)")
    names: dict[str, str | None] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise BenchmarkError(f"evaluate.benchmarks: {path}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            metrics = doc.get("metric_list") or [{}]
            names[doc["task"]] = metrics[0].get("metric") if isinstance(metrics[0], dict) else None
    if not names:
        raise BenchmarkError(f"evaluate.benchmarks: {folder} holds no lm-eval task (no *.yaml with a `task:` name)")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False, verbosity="ERROR")
    missing = [n for n in names if n not in set(manager.all_tasks)]
    try:
        if not missing:
            with _inside(folder):
                manager.load_task_or_group(list(names))  # builds each task: its keys and its data files are checked
    except Exception as e:  # noqa: BLE001  (lm-eval and datasets raise many types for a broken task)
        missing = [f"{', '.join(names)} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"]
    if missing:
        raise BenchmarkError(f"evaluate.benchmarks: {folder}: lm-eval does not load task {', '.join(missing)}; check the YAML keys and data files")
    return names


class _Loader:
    """yaml.SafeLoader that leaves lm-eval's `!function` tags alone (they name Python in the task folder)."""

    def __new__(cls, stream):
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
        return Loader(stream)


def check_folders(folders: list[str], root: Path) -> list[tuple[Path, dict[str, str | None]]]:
    """Each folder resolved against the project and its task names; the first bad one raises BenchmarkError."""
    out = []
    for entry in folders:
        folder = Path(entry) if Path(entry).is_absolute() else root / entry
        out.append((folder, task_names(folder)))
    return out


def run_tasks(model, tokenizer, tasks: list[tuple[Path, dict[str, str | None]]], batch_size: int, limit: int | None,
              label: str = "model") -> dict[str, dict]:
    """{task: {"metric", "value", "stderr", "higher_is_better", "n"}} for one model (in memory)."""
    import io

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tunepath.progress import Progress

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = {}
    progress = Progress(len(tasks), f"evaluate: {label} benchmarks", unit="folder", logger=log)
    for folder, names in tasks:
        manager = TaskManager(include_path=str(folder), include_defaults=False, verbosity="ERROR")
        # lm-eval draws three bars of its own per task (it passes disable_tqdm=False itself): one of tunepath's instead
        with _inside(folder), contextlib.redirect_stderr(io.StringIO()):
            try:
                result = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=False,
                                         bootstrap_iters=200, verbosity="ERROR")
            except Exception as e:  # noqa: BLE001  (lm-eval and datasets raise many types for a broken task)
                progress.close(failed=True)
                raise BenchmarkError(f"evaluate.benchmarks: {folder}: lm-eval failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        progress.update(1)
        for name, main in names.items():
            scores = result["results"][name]
            higher = result.get("higher_is_better", {}).get(name, {})
            found = [k.split(",")[0] for k in scores if "," in k and not k.split(",")[0].endswith("_stderr")]
            metric = main if main in found else found[0]
            out[name] = {"metric": metric, "value": float(scores[f"{metric},none"]),
                         "stderr": _float(scores.get(f"{metric}_stderr,none")), "higher_is_better": bool(higher.get(metric, True)),
                         "n": int(result.get("n-samples", {}).get(name, {}).get("effective", 0)), "folder": str(folder)}
    progress.close()
    return out


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def compare_benchmarks(base: dict, tuned: dict) -> dict:
    """{task: base and tuned score, change (relative for perplexity-like metrics)}."""
    out = {}
    for name, t in tuned.items():
        b = base[name]
        change = t["value"] - b["value"] if t["higher_is_better"] else (t["value"] / b["value"] - 1 if b["value"] else 0.0)
        out[name] = {"metric": t["metric"], "base": b["value"], "tuned": t["value"], "base_stderr": b["stderr"],
                     "tuned_stderr": t["stderr"], "higher_is_better": t["higher_is_better"], "change": change, "n": t["n"]}
    return out


def benchmark_gates(tasks: dict, max_drop: float, confidence: float) -> dict[str, dict]:
    """Per task: fails when the drop is beyond `max_drop` even at the favourable end of the change's interval
    (normal, from lm-eval's standard errors; a metric without one, like word perplexity, uses the point)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    gates = {}
    for name, c in tasks.items():
        se = ((c["base_stderr"] or 0) ** 2 + (c["tuned_stderr"] or 0) ** 2) ** 0.5
        if c["higher_is_better"]:
            ok = c["change"] + z * se >= -max_drop
            detail = (f"{c['metric']} tuned {c['tuned']:.3f} vs base {c['base']:.3f}: change {c['change']:+.3f} "
                      f"[{c['change'] - z * se:+.3f}, {c['change'] + z * se:+.3f}] over {c['n']} docs; may drop at most {max_drop}")
            rule = f"upper end of the change's interval >= -{max_drop}"
        else:
            ok = c["change"] <= max_drop
            detail = (f"{c['metric']} tuned {c['tuned']:.3f} vs base {c['base']:.3f}: change {c['change']:+.1%} over {c['n']} docs; "
                      f"may rise at most {max_drop:.0%}")
            rule = f"relative rise <= {max_drop}"
        gates[f"benchmark:{name}"] = {"metric": c["metric"], "rule": rule, "passed": ok, "detail": detail}
    return gates
