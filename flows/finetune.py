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
def finetune(config: Config = Config(), project_dir: str = ".", tracking_uri: str | None = None) -> dict:
    """Fine-tune `config.model.base` on the data in `config.data.raw_dir` and register the result in MLflow.

    The effective config is written into params.yaml first (as `dvc exp run --set-param` does), and every stage is
    recorded in dvc.lock, so `dvc repro` reproduces this run and `dvc status` is clean after it. One run at a
    time per project folder: another one (CLI, deployment, `dvc repro`) is refused with its pid and start time.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    # one run per project folder: params.yaml, artifacts/ and dvc.lock are shared (`tunepath run` took it already)
    with project_lock(root, dvc=True, what=f"Prefect flow run {flow_run.name} (finetune)"):
        changed = write_params(root / "params.yaml", config)
        if changed:
            logger.info("params.yaml updated with this run's values: %s", ", ".join(changed))
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
        workspace = Workspace(root=root, tracking_uri=uri)
        refuse_special_files(root / config.data.raw_dir)  # before DVC hashes the folder: a FIFO would block it forever
        results = [run_stage_task(name, config, workspace) for name in STAGES]
    skipped = [r["stage"] for r in results if r["skipped"]]
    logger.info("done: %d stages ran, %d up to date (%s)", len(STAGES) - len(skipped), len(skipped), ", ".join(skipped) or "none")
    return {"ran": [r["stage"] for r in results if not r["skipped"]], "skipped": skipped}


if __name__ == "__main__":
    from tunepath.cli import main

    raise SystemExit(main(["run"]))
