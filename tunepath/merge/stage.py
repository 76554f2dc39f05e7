"""run_merge: merged weights, tokenizer with the training chat template, and parity checks.

    tunepath stage merge        # what dvc repro runs; reads artifacts/{tokenize,train,evaluate}
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

from tunepath.evaluate.models import ADAPTER_METHODS, AdapterMismatch, Runtime, apply_adapter, load_folder, load_quantized_base, load_tuned, pick_runtime
from tunepath.evaluate.samples import end_of_turn_ids
from tunepath.evaluate.scoring import mean_loss, row_logprobs
from tunepath.merge import MergeConfig
from tunepath.merge.parity import ParityError, evaluated_gap, logits_of, relative_gap, template_parity
from tunepath.sections import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["ParityError", "run_merge"]


def run_merge(cfg: MergeConfig, model: ModelConfig, tokenize_dir: Path, train_dir: Path, evaluate_dir: Path, out_dir: Path) -> dict:
    """Write `out_dir/model/` and `out_dir/parity.json`; raise ParityError (after writing parity.json) on a failed check."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    if out_dir.exists():
        shutil.rmtree(out_dir)
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True)
    train = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    method, trust = train["method"], model.trust_remote_code
    scores_path = evaluate_dir / "row_scores.json"
    if not scores_path.exists():
        raise FileNotFoundError(f"{scores_path}: missing; the evaluate stage writes it (run it before merge)")
    evaluated = json.loads(scores_path.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenize_dir / "tokenizer"))
    held = load_from_disk(str(tokenize_dir / evaluated["split"] / "eval"))
    rows = list(held.select(range(min(cfg.parity_rows, len(held)))))
    runtime = pick_runtime(cfg.precision)
    fp32 = Runtime(runtime.device, "fp32")

    try:
        # The reference: what training produced, computed without merging (peft's LoRA forward, or the full weights), in fp32.
        reference = load_tuned(train, train_dir, fp32, trust_remote_code=trust)
        expected = logits_of(reference, rows, fp32.device)
        del reference
        if method in ADAPTER_METHODS:
            # QLoRA too: a fresh unquantized copy of the base; merging into 4-bit weights would round the update away.
            base = load_folder(train["start_model"], runtime, trust)
            merged = apply_adapter(base, train_dir / "adapter").merge_and_unload()
        else:
            merged = load_folder(train_dir / "model", runtime, trust)  # full fine-tuning: package the weights as they are
    except AdapterMismatch as e:
        raise ParityError(str(e)) from e
    package(merged, tokenizer, end_of_turn_ids(_sft_rows(tokenize_dir), tokenizer), model_dir)
    del merged

    check = load_folder(model_dir, fp32, trust)
    merged_logits = logits_of(check, rows, fp32.device)
    gap = relative_gap(merged_logits, expected)
    scored = check if evaluated["precision"] == "fp32" else load_folder(model_dir, Runtime(runtime.device, evaluated["precision"]), trust)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    merged_scores = row_logprobs(scored, rows, pad, 8, runtime.device)
    ev_gap = evaluated_gap(merged_scores, evaluated["rows"][: len(rows)])
    del check, scored
    tolerance = cfg.parity_tolerance if runtime.precision == "fp32" else cfg.parity_tolerance_bf16
    template = template_parity(tokenize_dir, model_dir)
    parity = {
        "method": method, "precision": runtime.precision, "rows": len(rows), "split": evaluated["split"],
        "relative_gap": gap, "tolerance": tolerance,
        "evaluated_gap": ev_gap, "evaluated_tolerance": cfg.evaluated_tolerance, "evaluated_precision": evaluated["precision"],
        "template": template,
        "quantized": quantized_distance(train, train_dir, rows, merged_logits, merged_scores, pad, trust) if method == "qlora" else None,
    }
    failures = []
    if gap > tolerance:
        failures.append(f"merged logits differ from base + adapter by {gap:.3e} (tolerance {tolerance}, {runtime.precision} merge)")
    if ev_gap > cfg.evaluated_tolerance:
        failures.append(f"a held-out row's loss differs by {ev_gap:.2%} from what the evaluate stage measured for the tuned model "
                        f"(tolerance {cfg.evaluated_tolerance:.2%}): the adapter or the base changed after evaluation; re-run train or evaluate")
    if not template["equal"]:
        failures.append("the merged folder's tokenizer renders the golden conversation differently from training "
                        f"(conversation equal: {template['conversation_equal']}, generation prompt equal: {template['prompt_equal']})")
    parity["passed"] = not failures
    (out_dir / "parity.json").write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
    log.info("merged (%s): logit gap %.2e, evaluated-loss gap %.2e, template equal %s", runtime.precision, gap, ev_gap, template["equal"])
    if failures:
        raise ParityError("; ".join(failures) + f". See {out_dir / 'parity.json'}")
    return parity


def package(merged, tokenizer, eot_ids: list[int], model_dir: Path) -> None:
    """Weights, config, tokenizer with the chat template, and a generation config that stops at the end of a turn."""
    merged.config.use_cache = True
    gen = merged.generation_config
    current = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = list(dict.fromkeys([*eot_ids, *[i for i in current if i is not None]]))
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


def quantized_distance(train: dict, train_dir: Path, rows, merged_logits: list, merged_scores: list, pad: int, trust: bool) -> dict:
    """How far the merged (unquantized) model moved from the 4-bit base + adapter that training optimised."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        return {"measured": False, "reason": "needs a CUDA GPU with bitsandbytes to load the 4-bit base"}
    quant = apply_adapter(load_quantized_base(train["start_model"], train.get("quantization"), trust), train_dir / "adapter")
    logits = logits_of(quant, rows, "cuda")
    loss_4bit = mean_loss(row_logprobs(quant, rows, pad, 8, "cuda"))[0]
    del quant
    return {"measured": True, "relative_gap": relative_gap(merged_logits, logits),
            "loss_4bit": loss_4bit, "loss_merged": mean_loss(merged_scores)[0]}


def _sft_rows(tokenize_dir: Path) -> list:
    from datasets import load_from_disk

    path = tokenize_dir / "sft" / "eval"
    return list(load_from_disk(str(path)).select_columns(["labels"])) if path.exists() else []
