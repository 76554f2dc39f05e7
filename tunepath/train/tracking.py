"""What a person watching training sees: per-step metrics in the Trainer's history, MLflow, logs, a loss curve.

- Every logged step gets `tokens_per_second` (non-padding input tokens since the previous log, over the wall
  time since then) added to the Trainer's `log_history`, so it is saved in checkpoints and survives a resume.
- With a tracking URI, the same metrics go to one MLflow run (experiment `tunepath`, tag `stage=train`) while
  training runs, at the global step across plan stages; a resumed training continues the same run.
- Progress: a `tunepath.progress.Progress` per plan stage: on a terminal a bar with ETA, loss and tokens/s; its
  lines (about 20 per plan stage, with ETA, loss, learning rate, grad norm, tokens/s) go to this module's logger,
  which the Prefect task's logger shows (PREFECT_LOGGING_EXTRA_LOGGERS=tunepath) and a log file keeps. The
  Trainer's own bar and its printed log dicts are off (`recipe.build_args`, `recipe.train_stage`). An optional
  `on_progress(dict)` callback gets every logged step, for a progress bar in a UI.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from tunepath.registry import fail_orphaned_runs, process_tags

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("step", "stage", "loss", "learning_rate", "grad_norm", "tokens_per_second")
TRACKED = ("loss", "learning_rate", "grad_norm", "tokens_per_second")


class MlflowSink:
    """Per-step metrics to one MLflow run, logged asynchronously so training does not wait on the database.

    `pipeline_run_id`: the pipeline's run (the flow opened it and ends it): metrics go there and this sink leaves
    its status alone. Otherwise `run_id` (a resumed training's run) continues, or a new run is opened, named
    `pipeline-<UTC time>`, which the register stage later logs the model into (`dvc repro` without the flow).
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path, run_id: str | None, tags: dict[str, str],
                 pipeline_run_id: str | None = None) -> None:
        from mlflow import MlflowClient

        from tunepath.registry import PIPELINE_TAG, existing_run, experiment_id

        self.client = MlflowClient(tracking_uri)
        self.logged: dict[str, int] = {}  # metric -> last step already in the run (a resumed run has some)
        self.owned = True
        fail_orphaned_runs(self.client)
        if pipeline_run_id is not None:
            if existing_run(self.client, pipeline_run_id):
                run_id, self.owned = pipeline_run_id, False
            else:
                log.warning("MLflow run %s (%s) is not in %s; training logs to a run of its own", pipeline_run_id,
                            "TUNEPATH_MLFLOW_RUN_ID or the flow", tracking_uri)
        if self.owned and run_id is not None and not existing_run(self.client, run_id):
            log.warning("MLflow run %s of the interrupted training is gone; starting a new run", run_id)
            run_id = None
        if run_id is None:
            import datetime

            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
            run_id = self.client.create_run(experiment_id(self.client, experiment, Path(artifact_root)),
                                            tags={"stage": "train", PIPELINE_TAG: "true", **tags, **process_tags()},
                                            run_name=f"pipeline-{stamp}").info.run_id
        else:
            if self.owned:
                self.client.update_run(run_id, status="RUNNING")
            for key, value in {**tags, **(process_tags() if self.owned else {})}.items():
                self.client.set_tag(run_id, key, value)
            # steps between the last checkpoint and the kill were logged before it and are trained again now
            for key in self.client.get_run(run_id).data.metrics:
                self.logged[key] = max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
        self.run_id = run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        if fresh:
            self.client.log_batch(self.run_id, params=fresh)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v)) and step > self.logged.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=False)

    def log_artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow

        mlflow.flush_async_logging()
        if self.owned:  # a pipeline run is ended by whoever opened it (ending a run also flushes its queue)
            self.client.set_terminated(self.run_id, status=status)
            return
        # the client's own store holds the queue when its URI is not the process's tracking URI: flush that one
        # too, or the register stage may read the run before the last steps are in it
        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        if store is not None:
            store.flush_async_logging()


def step_callback(stage: str, index: int, count: int, step_offset: int, sink: MlflowSink | None,
                  on_progress: Callable[[dict], None] | None):
    """A TrainerCallback adding tokens/s to each logged step and passing it to MLflow, the log and on_progress."""
    from transformers import TrainerCallback

    class StepTracker(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            from tunepath.progress import Progress

            self.last_time = time.perf_counter()
            self.last_tokens = state.num_input_tokens_seen
            self.progress = None
            self.last_step = state.global_step  # a resumed run starts at its checkpoint's step
            if state.is_world_process_zero:
                self.progress = Progress(state.max_steps, f"train {stage} ({index + 1}/{count})", unit="step",
                                         initial=state.global_step, logger=log, on_bar=("loss",))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            now = time.perf_counter()
            seconds = now - self.last_time
            tokens = state.num_input_tokens_seen - self.last_tokens
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
            tps = round(tokens / seconds, 1) if seconds > 0 else None
            # the Trainer appended these logs to its history just before calling us; the history is checkpointed
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["tokens_per_second"] = tps
            row = {"stage": stage, "step": state.global_step, "global_step": step_offset + state.global_step,
                   "max_steps": state.max_steps, "stage_index": index, "stages": count, "tokens_per_second": tps,
                   **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}}
            if sink is not None:
                sink.log({k: row.get(k) for k in TRACKED + tuple(k for k in logs if k.startswith(("dpo_", "kto_")))}, row["global_step"])
            if on_progress is not None:
                try:
                    on_progress(row)
                except Exception as e:  # a UI hiccup must not end a training run (KeyboardInterrupt still does)
                    log.warning("progress callback failed at step %d: %s", state.global_step, e)
            if self.progress is not None:
                self.progress.update(state.global_step - self.last_step, tokens_per_second=tps, loss=row["loss"],
                                     lr=row.get("learning_rate"), **{"grad norm": row.get("grad_norm")})
            self.last_step = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    return StepTracker()


def logged_steps(log_history: list[dict], stage: str) -> list[dict]:
    """The per-step rows of one plan stage from a Trainer's history (the final summary entry left out)."""
    return [{"stage": stage, **h} for h in log_history if "loss" in h and "step" in h]


def write_loss_curve(steps: list[dict], path: Path) -> None:
    """A CSV that `dvc plots` reads: one row per logged step; `step` counts across plan stages (`global_step`)."""
    lines = [",".join(CURVE_COLUMNS)]
    for s in steps:
        tps = s.get("tokens_per_second")
        lines.append(
            f"{s.get('global_step', s['step'])},{s['stage']},{s['loss']:.6f},{s.get('learning_rate', 0):.6g},"
            f"{s.get('grad_norm', 0):.6g},{'' if tps is None else f'{tps:.1f}'}"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
