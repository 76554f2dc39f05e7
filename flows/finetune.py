"""The `finetune` flow: validate → tokenize → route → train → evaluate → merge → register.

Run it with `tunepath run`, from the Prefect UI (deployment `finetune`), or directly:

    python -m flows.finetune
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from tasks.stages import run_stage_task
from tunepath import isolate, workspaces
from tunepath.config import STAGES, Config
from tunepath.errors import describe
from tunepath.params import write_params
from tunepath.registry import RUN_ENV, end_pipeline_run, open_pipeline_run, run_url
from tunepath.runlock import ProjectBusy, file_lock, project_lock
from tunepath.stages import Workspace, default_tracking_uri
from tunepath.validate.readers import refuse_special_files


WorkspaceMode = Literal["auto", "in-place", "isolated"]


@flow(name="finetune")
def finetune(recipe: str = "", config: Config = Config(), project_dir: str = ".", tracking_uri: str | None = None,
             workspace: WorkspaceMode = "auto") -> dict:
    """Fine-tune `config.model.base` on the data in `config.data.raw_dir` and register the result in MLflow.

    The effective config is written into params.yaml first (as `dvc exp run --set-param` does), and every stage is
    recorded in dvc.lock, so `dvc repro` reproduces this run and `dvc status` is clean after it. When another run
    works in the project folder, this one works in its own working copy (tunepath.isolate) and lands as a DVC
    experiment instead; the project's params.yaml, dvc.lock and artifacts/ are then left as they are.
    The whole run is one MLflow run named after this flow run (tunepath.registry): linked from here, linking back,
    opened by the first stage that runs (none when every stage is up to date: the page links the run behind the results).

    Args:
        recipe: A recipe from examples/recipes/ (a name like `lora_sft`, or a path in the project). Its values go over
            the defaults, then every setting below that you changed, as `tunepath run --config RECIPE --set ...`.
            Empty: the settings below as they are.
        config: Every setting of params.yaml: data, model and the training basics first, the demo's last.
        project_dir: The project folder (params.yaml, dvc.yaml, data) on the worker.
        tracking_uri: MLflow tracking URI; empty: MLFLOW_TRACKING_URI or the project's own.
        workspace: `auto`: in the project folder when no other run works there, else in a working copy of its own
            (a DVC experiment); `in-place`: in the project folder, refused while another run works there;
            `isolated`: always in a working copy of its own.
    """
    from prefect.runtime import flow_run

    from tunepath import logs

    logs.setup(debug=bool(os.environ.get("TUNEPATH_DEBUG")), cli_reports_errors=False)  # a worker runs no CLI
    logger = get_run_logger()
    home = Path(project_dir).resolve()
    what = f"Prefect flow run {flow_run.get_name()} (finetune)"
    if recipe.strip():  # before the workspace is chosen: the recipe's values are part of what makes a run the same run
        config, recipe = resolved_recipe(recipe, config, home), ""
    key = workspaces.run_key(home, config.model_dump(mode="json")) if isolate.cannot_isolate(home) is None else None
    if workspace == "auto" and key and workspaces.resumable(home, key):
        workspace = "isolated"  # the same run, interrupted: it goes on in the copy it left, not in the folder
    if workspace != "isolated":
        # params.yaml, artifacts/ and dvc.lock are the project's: one run at a time there (`tunepath run` took it already)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(project_lock(home, dvc=True, what=what))
            except ProjectBusy as busy:
                if workspace == "in-place":
                    raise
                logger.info("%s; this run works in a working copy of its own", busy.holder_text)
            else:
                return run_pipeline(home, home, recipe, config, tracking_uri)
    with workspaces.working_copy(home, key or workspaces.run_key(home, config.model_dump(mode="json")), experiment_name(), what) as (copy, left):
        name = copy.name
        if not left:
            logger.info("working copy %s; the result lands as DVC experiment %s", copy, name)
        try:
            with project_lock(copy, dvc=True, what=what):
                result = run_pipeline(copy, home, recipe, config, tracking_uri, resumed=left is not None)
            result["experiment"] = isolate.land(copy, home, name, message=f"tunepath run {flow_run.get_name() or name}")
        except BaseException:
            logger.error("the working copy %s is kept: the same command again resumes there (`tunepath workspaces --clean` "
                         "removes it)", copy)
            raise
        isolate.close_copy(copy, home)
    logger.info("DVC experiment %s: `dvc exp show` lists it, `dvc exp apply %s` brings it into the project", name, name)
    return result


def resolved_recipe(recipe: str, config: Config, home: Path) -> Config:
    config, edits = with_recipe(recipe.strip(), config, home)
    get_run_logger().info("recipe %s, then the form's changes: %s", recipe.strip(), ", ".join(edits) or "none")
    return config


def run_pipeline(root: Path, home: Path, recipe: str, config: Config, tracking_uri: str | None, resumed: bool = False) -> dict:
    """Every stage in `root` (the project folder, or a working copy of `home`), under `root`'s locks."""
    logger = get_run_logger()
    if recipe.strip():
        config = resolved_recipe(recipe, config, home)
    changed = write_params(root / "params.yaml", config)
    if changed:
        logger.info("params.yaml updated with this run's values: %s", ", ".join(changed))
    if root != home:
        brought = isolate.bring_inputs(root, home, outputs=not resumed)
        logger.info("inputs: %s", "; ".join(f"{k} {', '.join(v)}" for k, v in brought.items() if v) or "all in git")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(home)
    refuse_special_files(root / config.data.raw_dir)  # before DVC hashes the folder: a FIFO would block it forever
    pipeline_run = LazyRun(uri, config.register.experiment, home)
    workspace = Workspace(root=root, tracking_uri=uri, open_mlflow_run=pipeline_run.open)
    results, current = [], None
    previous = os.environ.get(RUN_ENV)
    try:
        for current in STAGES:
            # the state, not the value: a skipped stage returns a `Cached` state, which `.result()` reads for both
            results.append(run_stage_task(current, config, workspace, return_state=True).result())
            pipeline_run.show()  # once the first stage that ran opened it: the link is there while the rest runs
    except BaseException as e:
        if pipeline_run.id:
            pipeline_run.show()
            end_run(uri, pipeline_run.id, failed=True, note=f"{current}: {describe(e)}")
        raise
    finally:
        if previous is None:
            os.environ.pop(RUN_ENV, None)
        else:
            os.environ[RUN_ENV] = previous
    skipped = [r["stage"] for r in results if r["skipped"]]
    run_id = pipeline_run.id
    if run_id:
        end_run(uri, run_id, failed=False, note=f"{len(STAGES) - len(skipped)} stages ran; up to date: {', '.join(skipped) or 'none'}")
    else:  # nothing ran, so nothing to log: the run that made these results stands for this one
        run_id = link_results_run(uri, root)
    restored = [r["stage"] for r in results if r.get("restored")]
    logger.info("done: %d stages ran, %d up to date (%s)%s", len(STAGES) - len(skipped), len(skipped), ", ".join(skipped) or "none",
                f"; restored from DVC's run cache: {', '.join(restored)}" if restored else "")
    record = root / "artifacts" / "register" / "model.json"
    return {"ran": [r["stage"] for r in results if not r["skipped"]], "skipped": skipped,
            "restored": restored, "mlflow_run_id": run_id,
            "seconds": {r["stage"]: r.get("seconds") for r in results},
            "mlflow_run_url": run_url(uri, run_id) if run_id else None, "mlflow_run_reused": pipeline_run.id is None,
            "workspace": "in-place" if root == home else "isolated",
            "registered": json.loads(record.read_text(encoding="utf-8")) if record.exists() else None}


class LazyRun:
    """This flow run's MLflow run, opened by the first stage that runs (`Workspace.with_mlflow_run`): a rerun that
    DVC finds up to date logs nothing, and an empty run would only crowd the experiment's list."""

    def __init__(self, uri: str, experiment: str, home: Path) -> None:
        self.uri, self.experiment, self.home = uri, experiment, home
        self.id: str | None = None
        self.shown = False

    def open(self) -> str:
        if self.id is None:
            # the first run to open a fresh store creates its tables and the experiment; two at once would both try
            with file_lock(isolate.shared_lock_path(self.home, "mlflow")):
                self.id = open_run(self.uri, self.experiment, self.home)
            os.environ[RUN_ENV] = self.id  # for the processes a stage starts (accelerate launch runs `tunepath stage train`)
        return self.id

    def show(self) -> None:
        """Put the run's link on the flow run's page, once it is open (in flow context: see `show_run`)."""
        if self.id and not self.shown:
            self.shown = True
            show_run(self.uri, self.experiment, self.id)


def experiment_name() -> str:
    """The DVC experiment's (and working copy's) name: the flow run's, made unique with its id."""
    from prefect.runtime import flow_run

    name, run_id = flow_run.get_name(), str(flow_run.get_id() or "")
    if name and run_id:
        return f"{re.sub(r'[^A-Za-z0-9-]+', '-', name).strip('-')}-{run_id[:6]}"
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def link_results_run(uri: str, root: Path) -> str | None:
    """The MLflow run that registered the project's current model (artifacts/register/model.json), linked from
    this flow run's page; None when there is no such record or the run is not in this tracking store."""
    import json

    from mlflow import MlflowClient
    from prefect.artifacts import create_markdown_artifact

    from tunepath.registry import existing_run

    record = root / "artifacts" / "register" / "model.json"
    if not record.exists():
        return None
    run_id = existing_run(MlflowClient(uri), json.loads(record.read_text(encoding="utf-8")).get("run_id"))
    if run_id is None:
        return None
    link = run_url(uri, run_id)
    where = f"[{link}]({link})" if link else f"run id `{run_id}` in `{uri}` (open it with `make mlflow-ui`)"
    create_markdown_artifact(f"# Every stage was up to date\n\nNo MLflow run was opened: nothing was logged. The results "
                             f"come from the run that registered the model: {where}\n", key="tunepath-mlflow-run",
                             description="the MLflow run behind this flow run's results")
    get_run_logger().info("every stage up to date: no new MLflow run; the results come from run %s", run_id)
    return run_id


def open_run(uri: str, experiment: str, root: Path) -> str:
    """This flow run's MLflow run, named and tagged after it (called by the first stage that runs)."""
    from prefect.runtime import flow_run

    name, flow_run_id = flow_run.get_name(), flow_run.get_id()
    tags = {"prefect.flow_run_id": str(flow_run_id or ""), "prefect.flow_run_name": name or "", "prefect.flow": "finetune"}
    if os.environ.get("PREFECT_API_URL") and flow_run_id:  # a temporary server's page is gone when the run ends
        tags["prefect.flow_run_url"] = flow_run.get_flow_run_ui_url() or ""
    return open_pipeline_run(uri, experiment, root / "mlartifacts", name, {k: v for k, v in tags.items() if v})


def show_run(uri: str, experiment: str, run_id: str) -> None:
    """The MLflow run's address as an artifact of the flow run itself. Called in the flow's code, not in the
    stage that opened the run: an artifact made in a task run is listed under that task run ("Task runs") and
    not on the flow run's own Artifacts tab."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.runtime import flow_run

    name, link = flow_run.get_name(), run_url(uri, run_id)
    logger = get_run_logger()
    if link:
        logger.info("MLflow run %s: %s", name, link)
        create_link_artifact(link, link_text=f"MLflow run {name}", key="tunepath-mlflow-run",
                             description="this flow run's MLflow run: per-step metrics, reports, the model")
    else:
        logger.info("MLflow run %s (id %s) in %s", name, run_id, uri)
        create_markdown_artifact(
            f"# MLflow run `{name}`\n\nRun id `{run_id}` in `{uri}`.\n\nOpen it with `make mlflow-ui`, then "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id_of(uri, run_id)}/runs/{run_id}\n",
            key="tunepath-mlflow-run", description="this flow run's MLflow run")


def end_run(uri: str, run_id: str, failed: bool, note: str) -> None:
    """End the MLflow run; a tracking fault here is reported, and never hides the stage's own error."""
    try:
        end_pipeline_run(uri, run_id, failed, note)
    except Exception as e:  # noqa: BLE001
        get_run_logger().warning("MLflow run %s could not be ended (%s)", run_id, describe(e))


def experiment_id_of(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.experiment_id


def with_recipe(recipe: str, config: Config, root: Path) -> tuple[Config, list[str]]:
    """The recipe over the defaults, then the form's edits: the values of `config` that differ from the form's
    defaults (the deployment's parameters, params.yaml's values when `tunepath up` registered it; outside a
    deployment Config's defaults). Returns the config and the edited keys."""
    from prefect.runtime import deployment

    from tunepath.params import changed_values, find_recipe, leaf_keys, load_recipe

    path = find_recipe(recipe, root)
    form_defaults = Config.model_validate((deployment.parameters or {}).get("config") or {}).model_dump(mode="json")
    edits = changed_values(config.model_dump(mode="json"), form_defaults)
    return load_recipe(path, edits=edits), leaf_keys(edits)


if __name__ == "__main__":
    from tunepath.cli import main

    raise SystemExit(main(["run"]))
