"""The `finetune` flow: validate → tokenize → route → train → evaluate → merge → register.

Run it with `tunepath run`, from the Prefect UI (deployment `finetune`), or directly:

    python -m flows.finetune
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger

from tasks.stages import run_stage_task
from tunepath.config import STAGES, Config
from tunepath.params import write_params
from tunepath.runlock import project_lock
from tunepath.stages import Workspace, default_tracking_uri
from tunepath.validate.readers import refuse_special_files


@flow(name="finetune")
def finetune(recipe: str = "", config: Config = Config(), project_dir: str = ".", tracking_uri: str | None = None) -> dict:
    """Fine-tune `config.model.base` on the data in `config.data.raw_dir` and register the result in MLflow.

    The effective config is written into params.yaml first (as `dvc exp run --set-param` does), and every stage is
    recorded in dvc.lock, so `dvc repro` reproduces this run and `dvc status` is clean after it. One run at a
    time per project folder: another one (CLI, deployment, `dvc repro`) is refused with its pid and start time.

    Args:
        recipe: A recipe from examples/recipes/ (a name like `lora_sft`, or a path in the project). Its values go over
            the defaults, then every setting below that you changed, as `tunepath run --config RECIPE --set ...`.
            Empty: the settings below as they are.
        config: Every setting of params.yaml: data, model and the training basics first, the demo's last.
        project_dir: The project folder (params.yaml, dvc.yaml, data) on the worker.
        tracking_uri: MLflow tracking URI; empty: MLFLOW_TRACKING_URI or the project's own.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    # one run per project folder: params.yaml, artifacts/ and dvc.lock are shared (`tunepath run` took it already)
    with project_lock(root, dvc=True, what=f"Prefect flow run {flow_run.name} (finetune)"):
        if recipe.strip():
            config, edits = with_recipe(recipe.strip(), config, root)
            logger.info("recipe %s, then the form's changes: %s", recipe.strip(), ", ".join(edits) or "none")
        changed = write_params(root / "params.yaml", config)
        if changed:
            logger.info("params.yaml updated with this run's values: %s", ", ".join(changed))
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
        workspace = Workspace(root=root, tracking_uri=uri)
        refuse_special_files(root / config.data.raw_dir)  # before DVC hashes the folder: a FIFO would block it forever
        # the state, not the value: a skipped stage returns a `Cached` state, which `.result()` reads for both
        results = [run_stage_task(name, config, workspace, return_state=True).result() for name in STAGES]
    skipped = [r["stage"] for r in results if r["skipped"]]
    logger.info("done: %d stages ran, %d up to date (%s)", len(STAGES) - len(skipped), len(skipped), ", ".join(skipped) or "none")
    return {"ran": [r["stage"] for r in results if not r["skipped"]], "skipped": skipped}


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
