"""run_register: the pipeline run's MLflow run gets params, metrics, reports, held-out data, lineage and the merged
model; a registry version from that run, with lineage and evaluation tags, a model card as its description
(`card.py`), and the alias `candidate`.

The run is the pipeline's (tunepath.registry): the flow's, else the one the train stage opened (its id in
artifacts/train/metrics.json), else, when training logged nowhere, a new one.

    tunepath stage register        # what dvc repro runs; reads artifacts/{validate,tokenize,route,train,evaluate,merge}
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from tunepath import lineage
from tunepath.errors import StageError
from tunepath.evaluate.heldout import Heldout, write_heldout
from tunepath.register import RegisterConfig
from tunepath.register.card import model_card
from tunepath.register.datasets import log_lineage
from tunepath.register.hub import HubReference, hub_references
from tunepath.registry import existing_run, fail_orphaned_runs, process_tags, run_url, set_alias

log = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers", "accelerate"]
REPORTS = {"validate": ["report.json", "report.md"], "tokenize": ["stats.json", "report.md"], "route": ["plan.json", "plan.md"],
           "train": ["metrics.json", "loss.csv", "loss.png"], "evaluate": ["metrics.json", "samples.jsonl", "row_scores.json", "report.md"], "merge": ["parity.json"]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def artifact_hash(model_dir: Path) -> str:
    """Identity of the merged model: the same bytes register once."""
    return lineage.tree_hash(model_dir)[:32]


def tokenizer_hash(model_dir: Path) -> str:
    """Identity of the tokenizer and chat template: perplexities compare only between versions that share it."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            h.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return h.hexdigest()[:32]


def find_version(client, name: str, digest: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("artifact_hash") == digest), None)


def open_experiment(mlflow, name: str, artifact_root: Path) -> str:
    """The experiment's id; a new one keeps its artifacts where `tunepath.registry.artifact_location` says."""
    from tunepath.registry import artifact_location

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_location(mlflow.get_tracking_uri(), artifact_root))


def evaluation_tags(evaluation: dict, parity: dict) -> dict[str, str]:
    """The gate metrics promotion compares, and what they were measured on."""
    tags = {
        "eval.split": evaluation["split_kind"],
        "eval.rows": evaluation["eval_rows"],
        "eval.degenerate_share": evaluation["degenerate_share"],
        "eval.stop_share": evaluation["stopped_at_eot_share"],
        "eval.samples": evaluation.get("samples", 0),
        "eval.precision": evaluation.get("precision", ""),
        "eval.fingerprint": evaluation.get("fingerprint", ""),
        "eval.passed": evaluation["passed"],
        "merge.relative_gap": parity.get("relative_gap", ""),
        "merge.evaluated_gap": parity.get("evaluated_gap", ""),
    }
    if (evaluation.get("preference") or {}).get("pairs"):
        tags["eval.preference_accuracy_sum"] = evaluation["preference"]["tuned_accuracy"]
    # every compared metric with its interval: "value [low, high]" for the tuned model, its base and the difference
    for name, c in (evaluation.get("comparison") or {}).items():
        if name == "relevance":
            tags["eval.relevance"] = _interval(c["diff"])
            continue
        ci = "_ci" if name == "perplexity" else ""  # eval.perplexity stays a plain number: promotion parses it
        tags[f"eval.{name}{ci}"] = _interval(c["tuned"])
        tags[f"eval.base_{name}{ci}"] = _interval(c["base"])
        tags[f"eval.{name}_diff"] = _interval(c["diff"])
    if evaluation.get("judge"):
        tags["eval.judge_win_rate"] = _interval(evaluation["judge"]["win_rate"])
    if evaluation.get("primary_metric"):
        tags["eval.primary_metric"] = evaluation["primary_metric"]
    tags["eval.perplexity"] = evaluation["tuned_perplexity"]
    tags["eval.base_perplexity"] = evaluation["base_perplexity"]
    for name, b in (evaluation.get("benchmarks") or {}).get("tasks", {}).items():
        tags[f"eval.benchmark.{name}"] = f"{b['tuned']:.4f} (base {b['base']:.4f})"
    return {k: str(v) for k, v in tags.items()}


def _interval(c: dict) -> str:
    return f"{c['value']:.4f} [{c['low']:.4f}, {c['high']:.4f}]"


def log_sample_table(samples_path: Path) -> None:
    """The per-prompt answers and scores as an MLflow evaluation table (the run's Evaluation/Artifacts view)."""
    import mlflow

    if not samples_path.exists():
        return
    rows = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return
    table: dict[str, list] = {k: [] for k in ("prompt", "reference", "base", "tuned")}
    for name in rows[0].get("tuned_scores") or {}:
        table[f"base_{name}"], table[f"tuned_{name}"] = [], []
    for r in rows:
        for k in ("prompt", "reference", "base", "tuned"):
            table[k].append(r.get(k, ""))
        for name in r.get("tuned_scores") or {}:
            table[f"base_{name}"].append(r["base_scores"][name])
            table[f"tuned_{name}"].append(r["tuned_scores"][name])
    mlflow.log_table(table, artifact_file="evaluate/samples_table.json")


def run_register(cfg: RegisterConfig, params: dict, root: Path, tracking_uri: str, artifacts: Path, out_dir: Path,
                 run_id: str | None = None) -> dict:
    """run_id: the pipeline run's MLflow run (None: the train stage's, from its metrics.json)."""
    import mlflow
    from mlflow import MlflowClient

    stage_dirs = {s: artifacts / s for s in ("validate", "tokenize", "route", "train", "evaluate", "merge")}
    model_dir = (stage_dirs["merge"] / "model").resolve()
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no merged model; run the merge stage first")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    fail_orphaned_runs(client)
    digest = artifact_hash(model_dir)
    plan = _read_json(stage_dirs["route"] / "plan.json")
    train = _read_json(stage_dirs["train"] / "metrics.json")
    evaluation = _read_json(stage_dirs["evaluate"] / "metrics.json")
    parity = _read_json(stage_dirs["merge"] / "parity.json")
    if not evaluation.get("passed") or not parity.get("passed"):
        raise StageError("the evaluation gates or the merge parity checks did not pass; nothing is registered "
                           f"(see {stage_dirs['evaluate'] / 'metrics.json'} and {stage_dirs['merge'] / 'parity.json'})")
    data_hash = lineage.data_hash(root, params["data"]["raw_dir"])
    commit = lineage.git_commit(root)
    tags = {
        "git_commit": commit,
        "data_hash": data_hash,
        "params_hash": lineage.params_hash(params),
        "artifact_hash": digest,
        "tokenizer_hash": tokenizer_hash(model_dir),
        "route.stages": ",".join(plan["stages"]),
        "route.method": plan["method"],
        "train.method": train["method"],
        "backend": train["backend"],
        "hardware": lineage.hardware(),
        **{f"lib.{k}": v for k, v in lineage.library_versions().items()},
        "lib.mlflow": mlflow.__version__,
        **evaluation_tags(evaluation, parity),
    }

    target = existing_run(client, run_id) or existing_run(client, train.get("mlflow_run_id"))
    existing = find_version(client, cfg.model_name, digest)
    if existing is not None:
        log.info("%s version %s already holds these weights; not registering again", cfg.model_name, existing.version)
        version, version_run = existing.version, existing.run_id
        if target and target != version_run:
            client.set_tag(target, "tunepath.registered_version", f"{cfg.model_name} version {version} (registered by run {version_run})")
    else:
        version, version_run = _log_and_register(cfg, params, root, model_dir, stage_dirs, plan, evaluation, parity, tags, client,
                                                 target, train)
    set_alias(client, cfg.model_name, cfg.alias, version)
    record = {"name": cfg.model_name, "version": str(version), "alias": cfg.alias, "run_id": version_run,
              "run_url": run_url(tracking_uri, version_run) if version_run else None,
              "uri": f"models:/{cfg.model_name}@{cfg.alias}", "tracking_uri": tracking_uri, "tags": tags,
              "reused": existing is not None}
    if existing is not None:
        # model.json describes the version it points at: that version's lineage, not this run's (whose settings
        # gave the same weights); this run's own identity is kept beside it
        record["tags"] = dict(existing.tags)
        record["this_run"] = {k: tags[k] for k in ("params_hash", "git_commit", "data_hash")}
    (out_dir / "model.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("registered %s version %s as @%s", cfg.model_name, version, cfg.alias)
    return record


def _log_and_register(cfg, params, root, model_dir, stage_dirs, plan, evaluation, parity, tags, client, run_id, train) -> tuple[str, str]:
    import mlflow

    from tunepath.serve.pyfunc import log_chat_model  # subclasses an MLflow class: imports mlflow

    if run_id is None:
        experiment_id = open_experiment(mlflow, cfg.experiment, root / "mlartifacts")
        opened = mlflow.start_run(experiment_id=experiment_id, run_name="register",
                                  tags={"tunepath.pipeline_run": "true"})
    else:
        opened = mlflow.start_run(run_id=run_id)
    with opened as run:
        logged = client.get_run(run.info.run_id).data
        mlflow.set_tags({**tags, **process_tags()})
        # the train stage logged its own train.* params into the same run: log only what is not there yet
        fresh = {k: v for k, v in flatten(params).items() if k not in logged.params}
        if fresh:
            mlflow.log_params(fresh)
        mlflow.log_dict(params, "params.json")
        numbers = {k: float(v) for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        numbers.update({f"merge_{k}": float(parity[k]) for k in ("relative_gap", "evaluated_gap") if isinstance(parity.get(k), (int, float))})
        mlflow.log_metrics(numbers)
        if "loss" not in logged.metrics:  # training logged elsewhere (or nowhere): its curve from loss.csv
            for step in _loss_rows(stage_dirs["train"] / "loss.csv"):
                mlflow.log_metric("train_loss", step["loss"], step=step["step"])
        for stage, files in REPORTS.items():
            for name in files:
                if (stage_dirs[stage] / name).exists():
                    mlflow.log_artifact(str(stage_dirs[stage] / name), artifact_path=stage)
        log_sample_table(stage_dirs["evaluate"] / "samples.jsonl")
        records = stage_dirs["validate"]  # its records/ shards
        with tempfile.TemporaryDirectory(prefix="tunepath-heldout-") as tmp:
            heldout = write_heldout(stage_dirs["tokenize"], records, Path(tmp) / "heldout")
            mlflow.log_artifacts(str(heldout), artifact_path="heldout")
            digest = Heldout.load(heldout, heldout / "records.jsonl").digest()
        log_lineage(params["data"]["raw_dir"], tags["data_hash"], tags["git_commit"], records, digest)
        problems = hub_references({}, model_dir)
        if problems:
            raise HubReference("the merged model points at a model hub, which serving machines may not reach: " + "; ".join(problems))
        # tunepath's own pyfunc, not the transformers flavour: that one tokenizes the rendered prompt whole, so
        # control-token text in a user message would become control tokens (a forged system turn)
        tokenize = params.get("tokenize") or {}
        info = log_chat_model(model_dir, "model", cfg.max_new_tokens, tokenize.get("template_kwargs") or {},
                              str(tokenize.get("render_date") or ""), PIP_REQUIREMENTS)
        run_id = run.info.run_id
    version = _new_version(client, cfg.model_name, info, run_id, tags)
    card = model_card(cfg.model_name, version.version, cfg.alias, base_model=params["model"]["base"], plan=plan, train=train,
                      evaluation=evaluation, validate=_read_json(stage_dirs["validate"] / "report.json"),
                      tokenize=_read_json(stage_dirs["tokenize"] / "stats.json"), tags=tags,
                      run={"run_id": run_id, "url": run_url(client.tracking_uri, run_id), **_flow_run_of(client, run_id)})
    client.update_model_version(cfg.model_name, version.version, description=card)
    client.set_tag(run_id, "tunepath.registered_version", f"{cfg.model_name} version {version.version}")
    return str(version.version), run_id


def _new_version(client, name: str, info, run_id: str, tags: dict):
    """A version from the logged model, linked to its run (through the client: no prints on stderr)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            client.get_registered_model(name)  # another run registered the name a moment ago; anything else raises
    return client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)


def _flow_run_of(client, run_id: str) -> dict:
    t = client.get_run(run_id).data.tags
    return {"flow_run": t.get("prefect.flow_run_name"), "flow_run_url": t.get("prefect.flow_run_url")}


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


def _loss_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [{"step": int(l.split(",")[0]), "loss": float(l.split(",")[2])} for l in lines if l]
