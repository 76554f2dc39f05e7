"""Prefect tasks: each stage's core function, skipped when DVC says it is up to date, recorded after it runs.

A skipped stage ends in a `Cached` state (type COMPLETED) whose message says why, so the run's page tells the
stages that ran from those DVC found up to date; the flow reads the task's record with `.result()`.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.states import Completed

from tunepath import isolate
from tunepath.ledger import Ledger
from tunepath.stages import Workspace, run_stage

REPORTS = {"validate": "report.md", "tokenize": "report.md", "route": "plan.md", "evaluate": "report.md"}


# DVC is the cache: Prefect's own result cache stays off so there is one source of truth about staleness.
@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE)
def run_stage_task(name: str, config, workspace: Workspace):
    logger = get_run_logger()
    started = time.perf_counter()
    ledger = Ledger(workspace.root)
    changes = ledger.changes(name)
    if not changes and name == "register":
        from tunepath.register.check import registry_gap

        gap = registry_gap(workspace.out("register") / "model.json", workspace.tracking_uri)
        if gap:
            changes = {name: [f"up to date in dvc.lock, but {gap}"]}
    if not changes:
        logger.info("%s: up to date in dvc.lock, skipped", name)
        republish(name, workspace)  # the run's page shows this stage's report as if it had run
        # Prefect 3.9 has no `Cached()` helper; its own cache hits are COMPLETED states named "Cached" like this one
        return Completed(name="Cached", message=f"{name}: up to date in dvc.lock (inputs, params and outputs unchanged)",
                         data={"stage": name, "skipped": True, "seconds": round(time.perf_counter() - started, 1)})
    # a run with the same inputs (another working copy of the project, or this folder earlier) may have made it
    with ledger.first_with_these_inputs(name, isolate.home_of(workspace.root) / isolate.LOCKS) as restored:
        if restored:  # tunepath.ledger said so in a line of its own
            republish(name, workspace)
            return Completed(name="Cached", message=f"{name}: restored from DVC's run cache (same deps and params)",
                             data={"stage": name, "skipped": True, "restored": True, "seconds": round(time.perf_counter() - started, 1)})
        logger.info("%s: running (%s)", name, describe_changes(changes.get(name, [])))
        workspace = workspace.with_mlflow_run()  # the first stage that runs opens the pipeline's MLflow run
        if name == "train":
            # one training per GPU slot across every worker of the server (`tunepath up` creates `gpu`, one per card);
            # without the limit (temporary server) Prefect logs a warning and trains anyway
            with concurrency("gpu", occupy=1, strict=False):
                summary = run_stage(name, config, workspace, on_progress=train_progress())
        else:
            try:
                summary = run_stage(name, config, workspace)
            except Exception:
                if name == "evaluate":
                    publish(name, workspace, {})  # a failed gate still shows its report and samples in the UI
                raise
        ledger.record(name)
        ledger.remember(name)
    publish(name, workspace, summary)
    return {"stage": name, "skipped": False, "seconds": round(time.perf_counter() - started, 1)}


def republish(name: str, workspace: Workspace) -> None:
    """Publish an up-to-date stage's existing outputs; a missing file only costs the artifact, not the run."""
    import json

    summary = {}
    record = workspace.out("register") / "model.json"
    if name == "register" and record.exists():
        summary = json.loads(record.read_text(encoding="utf-8"))
    try:
        publish(name, workspace, summary)
    except (OSError, KeyError, ValueError) as e:
        get_run_logger().warning("%s: its earlier report could not be shown (%s)", name, e)


def train_progress(every_s: float = 5.0):
    """A callback for the train stage that moves a Prefect progress artifact (at most every `every_s` seconds)."""
    import time

    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id, last = create_progress_artifact(0.0, key="tunepath-train-progress", description="training %"), [0.0]

    def on_progress(r: dict) -> None:
        end = r["stage_index"] + 1 == r["stages"] and r["step"] >= r["max_steps"]
        if time.monotonic() - last[0] < every_s and not end:
            return
        last[0] = time.monotonic()
        update_progress_artifact(artifact_id, round(100 * (r["stage_index"] + r["step"] / max(r["max_steps"], 1)) / r["stages"], 1))

    return on_progress


def describe_changes(entries: list) -> str:
    """DVC's status entries as one line, e.g. 'changed deps: data/raw; changed params: train.max_steps'."""
    parts = []
    for entry in entries:
        if isinstance(entry, dict):
            parts += [f"{kind}: {', '.join(map(str, what))}" for kind, what in entry.items()]
        else:
            parts.append(str(entry))
    return "; ".join(parts) or "not in dvc.lock yet"


def publish(name: str, workspace: Workspace, summary: dict) -> None:
    """Put what a person wants to see of this stage into the Prefect UI."""
    out = workspace.out(name)
    key = f"tunepath-{name}"
    if name == "evaluate" and (out / "samples.jsonl").exists():
        import json

        from prefect.artifacts import create_table_artifact

        from tunepath.evaluate.report import sample_table

        rows = [json.loads(l) for l in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
        create_table_artifact(sample_table(rows), key="tunepath-evaluate-samples", description="every held-out prompt: reference, base and tuned answers, ROUGE-L")
    if name in REPORTS and (out / REPORTS[name]).exists():
        create_markdown_artifact((out / REPORTS[name]).read_text(encoding="utf-8"), key=key, description=f"{name} report")
    elif name == "train":
        picture = loss_picture(out / "loss.png")
        create_markdown_artifact(picture + loss_table(out / "loss.csv"), key=key, description="training loss curve")
    elif name == "register":
        link = model_version_url(summary)
        if link:
            create_link_artifact(link, link_text=f"{summary['name']} version {summary['version']} in MLflow",
                                 key="tunepath-mlflow", description="the registered model version in the MLflow UI")
        run = f"[{summary['run_id']}]({summary['run_url']})" if summary.get("run_url") else f"`{summary['run_id']}`"
        create_markdown_artifact(
            f"# Registered\n\n`{summary['uri']}` is version **{summary['version']}** of `{summary['name']}` "
            f"(MLflow run {run}, tracking `{summary['tracking_uri']}`).\n\n"
            f"Chat with it: `tunepath chat {summary['uri']}`\n",
            key=key, description="MLflow model version",
        )


def loss_picture(path: Path) -> str:
    """The loss PNG inlined as a data URI: the run page shows it with no file server (empty without the file)."""
    import base64

    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"![loss and learning rate](data:image/png;base64,{data})\n\n"


def loss_table(path: Path, rows: int = 20) -> str:
    """About `rows` evenly spaced lines of the loss curve (and always the last one) as a markdown table."""
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f))
    every = max(1, len(lines) // rows)
    picked = lines[::every] + ([lines[-1]] if lines and (len(lines) - 1) % every else [])
    losses = [float(line["loss"]) for line in lines]
    table = ["# Training loss", ""]
    if losses:
        table += [f"`{losses[0]:.3f} {sparkline(losses)} {losses[-1]:.3f}` over {len(losses)} steps", ""]
    table += ["| step | stage | loss | learning rate |", "|---|---|---|---|"]
    for line in picked:
        table.append(f"| {line['step']} | {line['stage']} | {float(line['loss']):.4f} | {float(line['learning_rate']):.2e} |")
    return "\n".join(table) + "\n"


def sparkline(values: list[float], width: int = 40) -> str:
    """The curve in block characters (one per bucket of steps, bucket means), readable in any markdown view."""
    blocks = "▁▂▃▄▅▆▇█"
    size = max(1, -(-len(values) // width))
    means = [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(blocks[min(7, int((v - low) / span * 8))] for v in means)


def model_version_url(summary: dict) -> str | None:
    """The model version's page in the MLflow UI when the tracking URI is a server (a SQLite file has no UI address)."""
    base = summary["tracking_uri"].rstrip("/")
    if not base.startswith(("http://", "https://")):
        return None
    return f"{base}/#/models/{summary['name']}/versions/{summary['version']}"
