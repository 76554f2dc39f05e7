"""run_evaluate: score base and tuned model on the same held-out rows, generate samples, apply the gates."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from tunepath.collate import PadCollator
from tunepath.evaluate import EvaluateConfig
from tunepath.records import read_records
from tunepath.sections import ModelConfig

log = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """The tuned model did not pass an evaluation gate: nothing downstream may register it."""


def held_out_loss(model, rows, pad_id: int, batch_size: int) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over label tokens (labels != -100) and the token count."""
    import torch
    import torch.nn.functional as F

    collate = PadCollator(pad_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            # use_cache=False: with a cache the model ignores packed/padded segment boundaries
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    if count == 0:
        raise ValueError("held-out split has no label tokens to score; add eval data (validate.eval_share) or more records")
    return total / count, count


def is_degenerate(text: str, n: int) -> bool:
    """Empty, or looping: one n-gram of words, or of characters (CJK text, digit runs), 4+ times in a row."""
    if not text.strip():
        return True
    return _loops(text.split(), n) or _loops(list(text.replace(" ", "")), n)


def _loops(units: list[str], n: int) -> bool:
    for size in range(1, n + 1):
        for i in range(len(units) - 4 * size + 1):
            gram = units[i : i + size]
            if all(units[i + k * size : i + (k + 1) * size] == gram for k in range(1, 4)):
                if size > 1 or _long_run(units, i, gram):
                    return True
    return False


def _long_run(units: list[str], i: int, gram: list[str]) -> bool:
    """A single repeated unit counts only from 8 in a row ("!!!!" or "2000" are normal text)."""
    return units[i : i + 8] == gram * 8


def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, bool]:
    """Greedy answer to a prompt; returns the text and whether it stopped at an end-of-turn token."""
    import torch

    eos = [i for i in {tokenizer.eos_token_id, tokenizer.pad_token_id} if i is not None]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, len(prompt_ids) :].tolist()
    stopped = bool(new) and new[-1] in eos
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


def sample_prompts(records_path: Path, tokenizer, limit: int) -> list[dict]:
    """The first `limit` held-out conversations, cut before their last assistant turn."""
    prompts = []
    for rec in read_records(records_path, kind="conversation", split="eval"):
        if len(prompts) >= limit:
            break
        msgs = rec["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prefix = msgs[:last]
        templated = tokenizer.apply_chat_template(prefix, add_generation_prompt=True, tokenize=True, return_dict=False)
        raw = tokenizer(prefix[-1]["content"] + "\n", add_special_tokens=False)["input_ids"]
        prompts.append({"id": rec["id"], "prompt": prefix[-1]["content"], "reference": msgs[last]["content"],
                        "templated_ids": list(templated), "raw_ids": raw})
    return prompts


def run_evaluate(cfg: EvaluateConfig, model: ModelConfig, validate_dir: Path, tokenize_dir: Path, train_dir: Path, out_dir: Path) -> dict:
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    train = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenize_dir / "tokenizer"))
    kind = "sft" if (tokenize_dir / "sft" / "eval").exists() else "cpt"
    rows = list(load_from_disk(str(tokenize_dir / kind / "eval")))
    base = AutoModelForCausalLM.from_pretrained(train["start_model"], dtype="float32", trust_remote_code=model.trust_remote_code)
    base_loss, tokens = held_out_loss(base, rows, tokenizer.pad_token_id, cfg.batch_size)
    prompts = sample_prompts(validate_dir / "records.jsonl", tokenizer, cfg.samples)
    base_answers = [generate(base, tokenizer, p["templated_ids"], cfg.max_new_tokens)[0] for p in prompts]

    if train["method"] == "lora":
        tuned = PeftModel.from_pretrained(base, str(train_dir / "adapter"))
    else:
        tuned = AutoModelForCausalLM.from_pretrained(str(train_dir / "model"), dtype="float32")
    tuned_loss, _ = held_out_loss(tuned, rows, tokenizer.pad_token_id, cfg.batch_size)

    samples, degenerate, stopped_count = [], 0, 0
    for p, base_answer in zip(prompts, base_answers):
        answer, stopped = generate(tuned, tokenizer, p["templated_ids"], cfg.max_new_tokens)
        raw_answer, _ = generate(tuned, tokenizer, p["raw_ids"], cfg.max_new_tokens)
        bad = is_degenerate(answer, cfg.repeat_ngram)
        degenerate += bad
        stopped_count += stopped
        samples.append({"id": p["id"], "prompt": p["prompt"], "reference": p["reference"], "tuned": answer,
                        "tuned_without_template": raw_answer, "base": base_answer, "stopped_at_eot": stopped, "degenerate": bad})

    base_ppl, tuned_ppl = math.exp(base_loss), math.exp(tuned_loss)
    degenerate_share = degenerate / len(samples) if samples else 0.0
    gates = {
        "perplexity": {"passed": tuned_ppl <= base_ppl * (1 - cfg.min_ppl_improvement),
                       "detail": f"tuned {tuned_ppl:.2f} vs base {base_ppl:.2f}, needs <= {base_ppl * (1 - cfg.min_ppl_improvement):.2f}"},
        "degenerate": {"passed": degenerate_share <= cfg.max_degenerate_share,
                       "detail": f"{degenerate}/{len(samples)} samples empty or looping, allowed share {cfg.max_degenerate_share}"},
    }
    metrics = {
        "split_kind": kind,
        "eval_rows": len(rows),
        "eval_tokens": tokens,
        "base_loss": base_loss,
        "base_perplexity": base_ppl,
        "tuned_loss": tuned_loss,
        "tuned_perplexity": tuned_ppl,
        "perplexity_improvement": 1 - tuned_ppl / base_ppl,
        "degenerate_share": degenerate_share,
        "stopped_at_eot_share": stopped_count / len(samples) if samples else 0.0,
        "gates": gates,
        "passed": all(g["passed"] for g in gates.values()),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(render_report(metrics, samples), encoding="utf-8")
    log.info("base ppl %.2f, tuned ppl %.2f", base_ppl, tuned_ppl)
    if not metrics["passed"]:
        failed = "; ".join(f"{name}: {g['detail']}" for name, g in gates.items() if not g["passed"])
        raise GateFailed(f"evaluation gate failed ({failed}); nothing is registered. See {out_dir / 'metrics.json'}")
    return metrics


def render_report(metrics: dict, samples: list[dict]) -> str:
    lines = ["# Evaluation", "", "| metric | base | tuned |", "|---|---|---|",
             f"| held-out loss | {metrics['base_loss']:.4f} | {metrics['tuned_loss']:.4f} |",
             f"| perplexity | {metrics['base_perplexity']:.2f} | {metrics['tuned_perplexity']:.2f} |", "",
             "| gate | passed | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if g['passed'] else '**no**'} | {g['detail']} |" for name, g in metrics["gates"].items()]
    lines += ["", "## Samples", "", "| prompt | tuned | base |", "|---|---|---|"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:160]  # noqa: E731
    lines += [f"| {cell(s['prompt'])} | {cell(s['tuned'])} | {cell(s['base'])} |" for s in samples]
    return "\n".join(lines) + "\n"
