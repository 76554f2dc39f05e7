"""The `promote` flow: move the registry alias `champion` to the `candidate` version when it is better.

Run it with `tunepath promote [--model NAME] [--force] [--rollback]`, from the Prefect UI (deployment `promote`),
or directly:

    python -m flows.promote
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.promote import decide_task
from tunepath.promote import PromoteConfig
from tunepath.promote.report import render_decision
from tunepath.stages import default_tracking_uri


@flow(name="promote")
def promote(model_name: str = "tunepath-demo", force: bool = False, rollback: bool = False, tracking_uri: str | None = None,
            config: PromoteConfig = PromoteConfig(), project_dir: str = ".") -> dict:
    """Compare `candidate` with `champion` on the gate metrics and move `champion` only when the candidate is better.

    `force` promotes without comparing (recorded on the version); `rollback` points `champion` back at `previous`.
    The decision, with its numbers, becomes `promotion.*` tags on the version and a markdown artifact here.
    """
    logger = get_run_logger()
    if force and rollback:
        raise ValueError("promote: --force and --rollback do not combine; roll back, or force a promotion")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path(project_dir).resolve())
    record = decide_task("rollback" if rollback else "promote", model_name, uri, config, force)
    create_markdown_artifact(render_decision(record), key=f"promotion-{artifact_key(model_name)}",
                             description=f"promotion decision for {model_name}")
    logger.info("%s: %s; champion is version %s", model_name, record["decision"], record.get("champion_after"))
    return record


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "model"


if __name__ == "__main__":
    from tunepath.cli import main

    raise SystemExit(main(["promote"]))
