"""Prefect task around promotion: one visible, logged step in the `promote` flow; no retries (it moves aliases)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tunepath.promote import PromoteConfig
from tunepath.promote.core import promote_model, rollback_champion


@task(name="promote-decision", task_run_name="{action} {model_name}", cache_policy=NO_CACHE)
def decide_task(action: str, model_name: str, tracking_uri: str, config: PromoteConfig, force: bool) -> dict:
    if action == "rollback":
        return rollback_champion(model_name, tracking_uri)
    return promote_model(config, model_name, tracking_uri, force=force)
