"""One place that knows how each stage's core function is called: the DVC `cmd` and the Prefect task share it.

Every stage reads files under the project root and writes only `artifacts/<stage>/`; train also keeps
torch.compile's caches in COMPILE_CACHE of the project (of the home project for a working copy), which no
stage reads as an input: deleting it only makes the next compiled run slower to start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunepath.errors import StageError

log = logging.getLogger(__name__)

COMPILE_CACHE = Path(".tunepath") / "compile-cache"  # ignored by git, not a DVC output


@dataclass(frozen=True)
class Workspace:
    """The project folder a run works in, where MLflow records it, and the MLflow run of this pipeline run
    (tunepath.registry; None: train opens one and register logs into it). `open_mlflow_run` opens the pipeline's
    run when the first stage runs (`with_mlflow_run`): a rerun that DVC finds up to date opens none."""

    root: Path
    tracking_uri: str
    mlflow_run_id: str | None = None
    open_mlflow_run: Callable[[], str] | None = field(default=None, compare=False, repr=False)

    def with_mlflow_run(self) -> Workspace:
        """This workspace with its pipeline's MLflow run, opened now if it waits for a stage to run."""
        if self.mlflow_run_id is None and self.open_mlflow_run is not None:
            return replace(self, mlflow_run_id=self.open_mlflow_run())
        return self

    def out(self, stage: str) -> Path:
        return self.root / "artifacts" / stage

    def path(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.root / p


def default_tracking_uri(root: Path) -> str:
    """MLflow on a SQLite file in the project (absolute: DVC may run stages from another folder)."""
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def run_stage(name: str, cfg, ws: Workspace, on_progress=None) -> dict:
    """Run one stage's core function; record what its outputs were made from (tunepath.stamps), and before
    register, check that the whole chain was made from the params it records."""
    from tunepath import interrupt, stamps

    interrupt.current["stage"] = name  # what an interrupted run's message names
    specs = stamps.stage_specs(ws.root)
    params = cfg.model_dump(mode="json")
    record = None
    if name in specs and name != "register":
        record = stamps.inputs_of(name, params, ws.root / "artifacts", specs)
        (ws.out(name) / stamps.RECORD).unlink(missing_ok=True)  # a stage that fails half-way keeps no old record
    if name == "register" and "merge" in specs:
        stamps.check_chain(params, ws.root / "artifacts", specs)
    summary = _run_core(name, cfg, ws, on_progress)
    if record is not None and ws.out(name).is_dir() and os.environ.get("RANK", "0") == "0":  # one writer per GPU job
        stamps.write(ws.out(name), record)
    return summary


def _run_core(name: str, cfg, ws: Workspace, on_progress=None) -> dict:
    """One stage's core function with exactly the config sections and folders it depends on."""
    if name == "validate":
        from tunepath.validate import run_validate

        raw = ws.path(cfg.data.raw_dir)
        model = ws.path(cfg.model.base)  # its tokenizer's added tokens are the control text to look for
        return run_validate(cfg.validate, raw, ws.out("validate"), model if model.is_dir() else None, data=cfg.data)
    if name == "tokenize":
        from tunepath.tokenize import run_tokenize

        return run_tokenize(cfg.tokenize, resolve_model(cfg.model, ws), ws.out("validate"), ws.out("tokenize"), data=cfg.data)
    if name == "route":
        from tunepath.route import run_route
        from tunepath.route.stage import train_settings

        t = cfg.train
        return run_route(cfg.route, resolve_model(cfg.model, ws), ws.out("tokenize"), ws.out("route"),
                         train_settings(t, cfg.tokenize.max_length), max_steps=t.max_steps, grad_accum=t.grad_accum)
    if name == "train":
        return train_stage(cfg, ws, on_progress)
    if name == "evaluate":
        from tunepath.evaluate.stage import run_evaluate

        return run_evaluate(cfg.evaluate, resolve_model(cfg.model, ws), ws.out("validate"), ws.out("tokenize"), ws.out("train"),
                            ws.out("evaluate"), root=ws.root)
    if name == "merge":
        from tunepath.merge.stage import run_merge

        return run_merge(cfg.merge, resolve_model(cfg.model, ws), ws.out("tokenize"), ws.out("train"), ws.out("evaluate"), ws.out("merge"))
    if name == "register":
        from tunepath.register.stage import run_register

        return run_register(cfg.register, cfg.model_dump(mode="json"), ws.root, ws.tracking_uri, ws.root / "artifacts", ws.out("register"),
                            run_id=ws.mlflow_run_id)
    raise ValueError(f"unknown stage {name!r}; stages are validate, tokenize, route, train, evaluate, merge, register")


def train_stage(cfg, ws: Workspace, on_progress=None) -> dict:
    """Train in this process, or, when several GPUs are wanted, in one process per GPU under accelerate launch."""
    import json

    from tunepath.isolate import home_of
    from tunepath.train.launch import maybe_relaunch
    from tunepath.train.stage import run_train

    plan = json.loads((ws.out("route") / "plan.json").read_text(encoding="utf-8"))
    code = maybe_relaunch(cfg.train, ["--project", str(ws.root), "stage", "train"], method=plan["method"])
    if code is not None:
        if code:
            raise StageError(f"distributed training failed (exit code {code}); see the log above")
        return json.loads((ws.out("train") / "metrics.json").read_text(encoding="utf-8"))
    return run_train(cfg.train, resolve_model(cfg.model, ws), ws.out("route") / "plan.json", ws.out("tokenize"), ws.out("train"),
                     tracking_uri=ws.tracking_uri or None, experiment=cfg.register.experiment, on_progress=on_progress,
                     pipeline_run_id=ws.mlflow_run_id, compile_cache=home_of(ws.root) / COMPILE_CACHE)


def resolve_model(model, ws: Workspace):
    """Make a local base-model path absolute (hub ids pass through); fail early if a local-looking path is missing."""
    local = ws.path(model.base)
    looks_local = model.base.startswith((".", "/")) or local.exists() or model.base.count("/") != 1
    if looks_local and not (local / "config.json").exists():
        raise FileNotFoundError(
            f"model.base: {model.base!r} is not a model folder (no config.json at {local}). "
            "Build the demo model with `tunepath demo`, or set model.base to a Hugging Face model folder or hub id."
        )
    chat = model.chat_variant
    if chat and ws.path(chat).exists():
        chat = str(ws.path(chat))
    return model.model_copy(update={"base": str(local) if looks_local else model.base, "chat_variant": chat})
