"""run_register: an MLflow run with params, metrics, reports and the merged model; a registry version with lineage."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tunepath import lineage
from tunepath.register import RegisterConfig

log = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers", "accelerate"]


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def artifact_hash(merge_dir: Path) -> str:
    """Identity of the merged model: the same bytes register once."""
    return lineage.tree_hash(merge_dir)[:32]


def find_version(client, name: str, digest: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("artifact_hash") == digest), None)


def open_experiment(mlflow, name: str, artifact_root: Path) -> str:
    """The experiment's id; created with an explicit local artifact location so runs from any cwd agree."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def run_register(cfg: RegisterConfig, params: dict, root: Path, tracking_uri: str, artifacts: Path, out_dir: Path) -> dict:
    import mlflow
    from mlflow import MlflowClient

    merge_dir, stage_dirs = artifacts / "merge", {s: artifacts / s for s in ("validate", "tokenize", "route", "train", "evaluate")}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    digest = artifact_hash(merge_dir)
    plan = json.loads((stage_dirs["route"] / "plan.json").read_text(encoding="utf-8"))
    train = json.loads((stage_dirs["train"] / "metrics.json").read_text(encoding="utf-8"))
    evaluation = json.loads((stage_dirs["evaluate"] / "metrics.json").read_text(encoding="utf-8"))
    tags = {
        "git_commit": lineage.git_commit(root),
        "data_hash": lineage.data_hash(root, params["data"]["raw_dir"]),
        "params_hash": lineage.params_hash(params),
        "artifact_hash": digest,
        "route.stages": ",".join(plan["stages"]),
        "route.method": plan["method"],
        "backend": train["backend"],
        "hardware": lineage.hardware(),
        **{f"lib.{k}": v for k, v in lineage.library_versions().items()},
    }

    existing = find_version(client, cfg.model_name, digest)
    if existing is not None:
        log.info("%s version %s already holds these artifacts; not registering again", cfg.model_name, existing.version)
        version, run_id = existing.version, existing.run_id
    else:
        experiment_id = open_experiment(mlflow, cfg.experiment, root / "mlartifacts")
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.set_tags(tags)
            mlflow.log_params(flatten(params))
            mlflow.log_metrics({k: float(v) for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for step in _loss_rows(stage_dirs["train"] / "loss.csv"):
                mlflow.log_metric("train_loss", step["loss"], step=step["step"])
            mlflow.log_dict(plan, "route/plan.json")
            for stage, files in {"validate": ["report.json", "report.md"], "tokenize": ["stats.json"],
                                 "evaluate": ["metrics.json", "samples.jsonl"], "train": ["metrics.json", "loss.csv"]}.items():
                for name in files:
                    if (stage_dirs[stage] / name).exists():
                        mlflow.log_artifact(str(stage_dirs[stage] / name), artifact_path=stage)
            mlflow.transformers.log_model(
                str(merge_dir), name="model", task="text-generation", pip_requirements=PIP_REQUIREMENTS,
                registered_model_name=cfg.model_name,
            )
            run_id = run.info.run_id
        version = max((v for v in client.search_model_versions(f"name='{cfg.model_name}'") if v.run_id == run_id),
                      key=lambda v: int(v.version)).version
        for k, v in tags.items():
            client.set_model_version_tag(cfg.model_name, version, k, v)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    record = {"name": cfg.model_name, "version": str(version), "alias": cfg.alias, "run_id": run_id,
              "uri": f"models:/{cfg.model_name}@{cfg.alias}", "tracking_uri": tracking_uri, "tags": tags,
              "reused": existing is not None}
    (out_dir / "model.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("registered %s version %s as @%s", cfg.model_name, version, cfg.alias)
    return record


def _loss_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [{"step": int(l.split(",")[0]), "loss": float(l.split(",")[2])} for l in lines if l]
