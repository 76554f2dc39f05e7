"""run_merge: merged weights, tokenizer with the training chat template, and parity checks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tunepath.merge import MergeConfig
from tunepath.sections import ModelConfig

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The merged model does not behave like base + adapter, or its tokenizer renders differently."""


def logits_of(model, rows) -> "list":
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits.float() for r in rows]


def relative_gap(a: list, b: list) -> float:
    """max |a - b| / max |b| over all compared logits."""
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(y.abs().max()) for y in b)
    return worst / scale if scale else worst


def template_parity(tokenizer_dir: Path, merged_dir: Path) -> dict:
    """Render one golden conversation with both tokenizers; ids must be identical."""
    from transformers import AutoTokenizer

    golden = [
        {"role": "system", "content": "You are a helpful support agent."},
        {"role": "user", "content": "Where is my order #1234?"},
        {"role": "assistant", "content": "It ships tomorrow."},
        {"role": "user", "content": "我的退款什么时候到账？"},
    ]
    ids = []
    for folder in (tokenizer_dir, merged_dir):
        tok = AutoTokenizer.from_pretrained(str(folder))
        ids.append(list(tok.apply_chat_template(golden, add_generation_prompt=True, tokenize=True, return_dict=False)))
    return {"equal": ids[0] == ids[1], "tokens": len(ids[0])}


def run_merge(cfg: MergeConfig, model: ModelConfig, tokenize_dir: Path, train_dir: Path, out_dir: Path) -> dict:
    import torch
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    train = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenize_dir / "tokenizer"))
    kind = "sft" if (tokenize_dir / "sft" / "eval").exists() else "cpt"
    rows = list(load_from_disk(str(tokenize_dir / kind / "eval")).select(range(cfg.parity_rows))) if cfg.parity_rows else []
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    if train["method"] == "lora":
        # The reference is base + adapter in fp32; the merge happens in `precision` on a fresh copy of the base.
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(train["start_model"], dtype=torch.float32), str(train_dir / "adapter")
        )
        expected = logits_of(reference, rows)
        del reference
        base = AutoModelForCausalLM.from_pretrained(train["start_model"], dtype=dtype)
        merged = PeftModel.from_pretrained(base, str(train_dir / "adapter")).merge_and_unload()
    else:
        merged = AutoModelForCausalLM.from_pretrained(str(train_dir / "model"), dtype=dtype)
        expected = None
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    merged.generation_config.save_pretrained(str(out_dir))

    check = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    gap = relative_gap(logits_of(check, rows), expected) if expected is not None else 0.0
    template = template_parity(tokenize_dir / "tokenizer", out_dir)
    parity = {"method": train["method"], "precision": precision, "rows": len(rows), "relative_gap": gap,
              "tolerance": cfg.parity_tolerance, "template": template,
              "passed": gap <= cfg.parity_tolerance and template["equal"]}
    (out_dir / "parity.json").write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
    log.info("merged (%s): relative logit gap %.2e, template equal %s", precision, gap, template["equal"])
    if gap > cfg.parity_tolerance:
        raise ParityError(f"merged logits differ from base + adapter by {gap:.3e} (tolerance {cfg.parity_tolerance}); see {out_dir / 'parity.json'}")
    if not template["equal"]:
        raise ParityError("the merged folder's tokenizer renders the golden conversation differently from training")
    return parity
