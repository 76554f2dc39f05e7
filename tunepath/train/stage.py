"""run_train: the train stage's entry, used by `tunepath stage train` (DVC) and the Prefect task alike.

    from tunepath.train.stage import run_train
    summary = run_train(cfg.train, model_cfg, Path("artifacts/route/plan.json"), Path("artifacts/tokenize"),
                        Path("artifacts/train"), tracking_uri="sqlite:///.../mlflow.db")

The RoutePlan's stages run in order on ONE model object, each starting from the previous one's weights:
pretrain/CPT/SFT with the causal-LM loss on the tokenized rows, DPO and KTO with their own losses (`dpo.py`,
`kto.py`). With LoRA
one adapter keeps training through all plan stages, so the result is always one adapter on `start_model`,
which is what merge and evaluate load (no merged intermediate is written). DPO's reference is the model when
the DPO stage starts (after SFT), its log-probs computed before the first DPO step; see `dpo.py`. Pretraining
from scratch (start_from scratch, method full) initialises `model.base`'s architecture from its config.

Outputs (`artifacts/train/`, rewritten on every run; the same for both backends):

    metrics.json        backend (and why), method, weights ("adapter" | "model"), start_model, base_model,
                        stages (per plan stage: steps, losses, seconds, tokens/s, resumed_from_step),
                        first_loss, final_loss, trainable/total params, precision, mlflow_run_id,
                        seconds_to_first_step (from the stage's start, loading and compiling included),
                        speed_paths (attention, chunked_loss, compiled_layers: see speed.py),
                        quantization (qlora: the bitsandbytes 4-bit settings of the base)
    adapter/            PEFT adapter (lora, qlora), relative to start_model, with the tokenizer; or
    model/              full weights (safetensors) with the tokenizer (full)
    tokenizer/          tokenizer with the training chat template
    loss.csv            step,stage,loss,learning_rate,grad_norm,tokens_per_second
    loss.png            the loss curve and learning rate (`dvc plots show`, the Prefect run page, the MLflow run)
    stages/<stage>/trainer_state.json
    init/               the seeded random init (start_from scratch only; it is start_model then)

Checkpoints live beside it in `artifacts/checkpoints/train/` (see `checkpoints.py`): with train.save_steps > 0
a killed run, rerun with the same inputs and settings, resumes from the last complete checkpoint with the same
data order and ends at the same step with the same loss curve.

Backends (`pick_backend`; auto: hf with the speed paths of `speed.py` for LoRA and full fine-tuning, unsloth
for QLoRA on CUDA when installed, measured in benchmarks/README.md): `build_model` is the one place that loads
the start model. hf: transformers (+ peft; QLoRA through
`tunepath.train.quantize.load_4bit`, CUDA only). unsloth: `tunepath.train.unsloth_backend.build_model`
and its collator, imported only when chosen (importing unsloth patches transformers for the whole process).
Both then train with the same recipe and save through `Trainer.save_model`, so the layout above is the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from tunepath.sections import ModelConfig
from tunepath.train import TrainConfig
from tunepath.train.options import EngineOptions

log = logging.getLogger(__name__)

QLORA_ON_CPU = ("train.method qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora on this machine or force "
                "route.force_method: lora")
# settings that change neither the weights nor the data order: changing them keeps checkpoints usable
RESUME_NEUTRAL = {"save_steps", "checkpoint_limit", "keep_checkpoints", "logging_steps", "backend", "precision"}


def pick_backend(requested: str, method: str = "lora", processes: int = 1) -> tuple[str, str]:
    """The backend to use and why (logged and recorded with the model)."""
    import importlib.util

    import torch

    has_cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth":
        if not has_cuda:
            raise ValueError("train.backend: unsloth needs a CUDA GPU; use 'hf' or 'auto' on this machine")
        if not has_unsloth:
            raise ValueError("train.backend: unsloth is not installed; pip install 'tunepath[gpu]' or use 'hf'")
        return "unsloth", "requested in params"
    if requested == "hf":
        return "hf", "requested in params"
    if not has_cuda:
        return "hf", "auto: no CUDA GPU"
    if method != "qlora":
        # measured on an H200 (benchmarks/README.md): hf with the speed paths trains LoRA at 3.5x unsloth's
        # tokens/s at the 1.5B shape, and DDP/FSDP runs several times faster; unsloth's edge is memory
        return "hf", f"auto: {method} on CUDA trains fastest with hf and tunepath's speed paths (benchmarks/README.md)"
    if processes > 1:
        return "hf", "auto: QLoRA on several GPUs runs as DDP with hf"
    # measured on an H200 (benchmarks/README.md, lean mode): hf QLoRA with bf16 embeddings trains 7B at 1.2x the
    # unsloth backend without checkpointing and 3x with it, and its lean settings (offload, small micro-batches)
    # reach the unsloth backend's memory (7.86 against 7.74 GiB)
    return "hf", "auto: QLoRA on CUDA trains fastest with hf and tunepath's speed paths" + (
        " (unsloth is installed: train.backend unsloth picks it)" if has_unsloth else "")


def build_model(base: str, cfg: TrainConfig, method: str, precision: str, backend: str, max_length: int,
                trust_remote_code: bool = False, options: EngineOptions | None = None):
    """The start model, ready to train: full weights, or wrapped with fresh LoRA adapters (lora, qlora)."""
    from tunepath.train import recipe

    options = options or EngineOptions()

    cfg = cfg.resolved()  # callers outside the train stage (the benchmark) may pass `auto` knobs
    if backend == "unsloth":
        unsloth_backend = _gpu_module("unsloth_backend", "train.backend unsloth")
        model = unsloth_backend.build_model(base, cfg, method, precision, max_length, trust_remote_code)
    elif method == "qlora":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(QLORA_ON_CPU)
        quantize = _gpu_module("quantize", "train.method qlora")
        model = quantize.load_4bit(base, cfg, trust_remote_code, options.upcast_float_params)
    else:
        model = recipe.load_pretrained(base, cfg, method, precision, trust_remote_code)
    if method in recipe.ADAPTER_METHODS and not _is_peft(model):
        model = recipe.add_lora(model, cfg)
    if cfg.checkpoint_offload and cfg.gradient_checkpointing and backend == "hf":
        from tunepath.train import offload

        offload.enable(model, prefetch=options.offload_prefetch)
    return model


def _gpu_module(name: str, what: str):
    import importlib

    try:
        return importlib.import_module(f"tunepath.train.{name}")
    except ImportError as e:
        raise ValueError(f"{what} is not available in this installation (tunepath.train.{name}: {e}); "
                         "install the GPU extra (pip install 'tunepath[gpu]') or use backend hf with method lora") from e


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def pick_collator(backend: str, pad_token_id: int):
    """Batching of CPT/SFT rows: padded rows on hf; one flattened row under unsloth (its packed-sample path)."""
    if backend == "unsloth":
        return _gpu_module("unsloth_backend", "train.backend unsloth").make_collator(pad_token_id)
    from tunepath.collate import PadCollator

    return PadCollator(pad_token_id)


def start_model(plan: dict, model: ModelConfig) -> str:
    start = plan.get("start_from", "base")
    if start == "chat":
        if not model.chat_variant:
            raise ValueError("route plan starts from the chat variant but model.chat_variant is not set; set it or force a route")
        return model.chat_variant
    return model.base


def fingerprint(cfg: TrainConfig, plan: dict, start: str, backend: str, precision: str, tokenize_dir: Path) -> dict:
    """What must be equal for a checkpoint to be resumed: settings, plan, start model files, tokenized data."""
    model_files = []
    start_dir = Path(start)
    if start_dir.is_dir():
        model_files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in start_dir.iterdir() if p.is_file())
    stats = tokenize_dir / "stats.json"
    data = {
        "stats": hashlib.sha256(stats.read_bytes()).hexdigest() if stats.exists() else None,
        "files": sorted((str(p.relative_to(tokenize_dir)), p.stat().st_size) for p in tokenize_dir.rglob("*.arrow")),
    }
    return {
        "train": cfg.model_dump(mode="json", exclude=RESUME_NEUTRAL),
        "backend": backend,
        "precision": precision,
        "plan": {k: plan.get(k) for k in ("stages", "method", "start_from")},
        "start_model": start,
        "model_files": hashlib.sha256(json.dumps(model_files).encode()).hexdigest(),
        "data": hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(),
    }


def run_train(cfg: TrainConfig, model: ModelConfig, plan_path: Path, tokenize_dir: Path, out_dir: Path, *,
              tracking_uri: str | None = None, on_progress: Callable[[dict], None] | None = None,
              checkpoint_dir: Path | None = None, experiment: str = "tunepath", pipeline_run_id: str | None = None,
              compile_cache: Path | None = None) -> dict:
    """Train what the plan says; returns (and writes) metrics.json's content.

    tracking_uri: log per-step metrics to MLflow while training (None: no MLflow).
    on_progress: called with each logged step's metrics (stage, step, max_steps, loss, ...), e.g. to update a
    progress bar in a UI. checkpoint_dir: default `artifacts/checkpoints/train` beside `out_dir`.
    pipeline_run_id: the MLflow run of this pipeline run (tunepath.registry); None: a run of its own.
    compile_cache: folder for torch.compile's caches (train.compile), shared by reruns (`compile_cache.py`).
    Under `accelerate launch` every process runs this; only the main one writes files and talks to MLflow.
    """
    from accelerate import PartialState
    from transformers import AutoTokenizer, set_seed

    import time

    from tunepath.train import checkpoints, plot, recipe, speed, tracking

    started = time.perf_counter()
    first_step: list[float] = []

    def progress(row: dict) -> None:
        if not first_step:
            first_step.append(time.perf_counter() - started)
        if on_progress is not None:
            on_progress(row)

    out_dir, tokenize_dir = Path(out_dir), Path(tokenize_dir)
    plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    stages, method, start_from = list(plan["stages"]), plan["method"], plan.get("start_from", "base")
    recipe.check_plan(stages, method, start_from)
    cfg = cfg.resolved(plan.get("train"))  # train.* `auto` knobs take the route's choice
    log.info("train.gradient_checkpointing %s, train.micro_batch_tokens %d (%s)", cfg.gradient_checkpointing,
             cfg.micro_batch_tokens, ", ".join(f"{k} by {v}" for k, v in (plan.get("train") or {}).get("set_by", {}).items())
             or "no route choice in the plan: defaults")
    dist = PartialState()
    backend, why = pick_backend(cfg.backend, method, dist.num_processes)
    if method == "qlora" and backend == "hf":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(QLORA_ON_CPU)
    precision = recipe.pick_precision(cfg)
    log.info("backend %s (%s); stages %s, method %s, start from %s, precision %s", backend, why, stages, method, start_from, precision)
    stats = tokenize_dir / "stats.json"
    max_length = int(json.loads(stats.read_text(encoding="utf-8")).get("max_length", 0)) if stats.exists() else 0

    base = start_model(plan, model)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else checkpoints.default_root(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenize_dir / "tokenizer"))
    run: dict = {}
    with dist.main_process_first():  # the main process prepares the folders; the others wait, then read
        if dist.is_main_process:
            run = checkpoints.open_run(ckpt_root, fingerprint(cfg, plan, base, backend, precision, tokenize_dir), cfg.save_steps > 0)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True)
            if start_from == "scratch":
                recipe.init_from_config(base, out_dir.resolve() / "init", tokenizer, cfg.seed, model.trust_remote_code)
    if start_from == "scratch":
        base = str(out_dir.resolve() / "init")
    set_seed(cfg.seed)
    options = EngineOptions(compile_cache=compile_cache)
    net = build_model(base, cfg, method, precision, backend, max_length, model.trust_remote_code, options)
    speedups = speed.apply(net, cfg, backend, options)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    collator = pick_collator(backend, tokenizer.pad_token_id)

    sink = None
    if tracking_uri and dist.is_main_process and not _has_mlflow(tracking_uri):
        tracking_uri = None
    if tracking_uri and dist.is_main_process:
        sink = tracking.MlflowSink(tracking_uri, experiment, out_dir.resolve().parents[1] / "mlartifacts", run.get("mlflow_run_id"),
                                   {"route.stages": ",".join(stages), "route.method": method, "backend": backend},
                                   pipeline_run_id=pipeline_run_id)
        sink.log_params({f"train.{k}": v for k, v in cfg.model_dump(mode="json").items()})
        if cfg.save_steps > 0:
            checkpoints.write_run(ckpt_root, {**run, "mlflow_run_id": sink.run_id})

    per_stage, steps, offset, trainer = [], [], 0, None
    try:
        for i, stage in enumerate(stages):
            stage_cfg = cfg.for_stage(stage, stages)
            if stage_cfg.learning_rate != cfg.learning_rate:
                log.info("%s: learning rate %g (train.dpo_learning_rate %s)", stage, stage_cfg.learning_rate, cfg.dpo_learning_rate)
            result = recipe.train_stage(net, stage, (i, len(stages)), tokenize_dir, tokenizer, collator, stage_cfg,
                                        ckpt_root, precision, method, max_length, offset, sink, progress)
            trainer = result["trainer"]
            if dist.is_main_process:
                trainer.state.save_to_json(str(_mkdir(out_dir / "stages" / stage) / "trainer_state.json"))
            per_stage.append(result["metrics"])
            compare_speed(plan.get("train") or {}, result["metrics"])
            steps += [{**s, "global_step": offset + s["step"]} for s in result["steps"]]
            offset += result["metrics"]["steps"]
    except BaseException:
        if sink is not None:
            sink.finish("FAILED")
        raise
    weights = recipe.save_outputs(trainer, tokenizer, method, out_dir)  # collective under FSDP: every process calls it
    summary = {
        "backend": backend,
        "backend_reason": why,
        "method": method,
        "weights": weights,
        "stages": per_stage,
        "start_model": base,
        "base_model": model.base,
        "start_from": start_from,
        "precision": precision,
        "speed_paths": speedups,
        "trainable_params": trainable,
        "total_params": total,
        "first_loss": steps[0]["loss"] if steps else None,
        # to the first logged step (train.logging_steps, 1 by default): what compiling costs up front
        "seconds_to_first_step": round(first_step[0], 2) if first_step else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "mlflow_run_id": sink.run_id if sink else None,
    }
    if method == "qlora":
        summary["quantization"] = quantization_of(net)
    if dist.is_main_process:
        tracking.write_loss_curve(steps, out_dir / "loss.csv")
        plot.write_loss_plot(steps, out_dir / "loss.png", title=f"{method} {' then '.join(stages)}")
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if not cfg.keep_checkpoints:
            checkpoints.clear(ckpt_root)
    if sink is not None:
        sink.log({"final_loss": summary["final_loss"]}, offset)
        for name in ("loss.csv", "loss.png"):
            if (out_dir / name).exists():
                sink.log_artifact(out_dir / name, "train")
        sink.finish()
    dist.wait_for_everyone()
    return summary


SLOWER_THAN_PLANNED = 0.8


def compare_speed(planned: dict, metrics: dict) -> None:
    """Log the route plan's expected tokens/s beside the measured; a warning when measured is well below it."""
    expected, got = planned.get("tokens_per_second"), metrics.get("tokens_per_second")
    if not expected or not got:
        return
    gc = "on" if planned.get("gradient_checkpointing") else "off"
    text = (f"{metrics['stage']}: {got:,.0f} tokens/s per process, the route plan expected {expected:,.0f} "
            f"(checkpointing {gc}, micro-batches of {planned.get('micro_batch_tokens')} tokens; route.gpu_tflops sets the card's rate)")
    if got < SLOWER_THAN_PLANNED * expected:
        log.warning("%s: slower than planned", text)
    else:
        log.info("%s", text)


def _has_mlflow(tracking_uri: str) -> bool:
    """A training-only install (a GPU box with torch and transformers) may lack mlflow: train, say so, go on."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        return True
    log.warning("mlflow is not installed: per-step metrics go to loss.csv and this log only, not to %s", tracking_uri)
    return False


def quantization_of(model) -> dict | None:
    """The 4-bit settings QLoRA trained on (merge and evaluate rebuild the same quantized base from them)."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    keys = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
    return {k: str(q[k]).replace("torch.", "") if k.endswith("dtype") else q[k] for k in keys if k in q}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
