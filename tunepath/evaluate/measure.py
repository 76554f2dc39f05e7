"""One model on one held-out set: every number the gates and the promotion compare."""

from __future__ import annotations

from tunepath.evaluate import EvaluateConfig
from tunepath.evaluate.heldout import Heldout
from tunepath.evaluate.models import Runtime
from tunepath.evaluate.samples import Prompt, answer_prompts, conversation_prompts, end_of_turn_ids, sample_summary, text_prompts
from tunepath.evaluate.scoring import feedback_scores, mean_loss, perplexity, preference_scores, prompt_dependence, row_logprobs


def prepare_prompts(heldout: Heldout, tokenizer, cfg: EvaluateConfig) -> tuple[list[Prompt], list[int]]:
    """The prompts and the end-of-turn ids, the same for every model measured on this held-out set."""
    sft = heldout.splits.get("sft", [])
    eot = end_of_turn_ids(sft, tokenizer)
    if not eot:
        raise ValueError("cannot tell the end-of-turn token: the tokenizer has no eos_token and no SFT rows are held out")
    if "sft" in heldout.splits:
        prompts = conversation_prompts(sft, heldout.records(heldout.records_kind), tokenizer, cfg.samples)
    else:
        prompts = text_prompts(heldout.rows, tokenizer, cfg.samples)
    return prompts, eot


def measure(model, tokenizer, heldout: Heldout, cfg: EvaluateConfig, runtime: Runtime, prompts: list[Prompt],
            eot_ids: list[int], untemplated: int = 0, label: str = "model") -> dict:
    """Loss and perplexity on every held-out split, preference log-probs, prompt dependence (SFT rows, when the
    relevance gate is on), and an answer to every prompt."""
    import time

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_ids[0]
    started = time.perf_counter()
    splits, row_scores = {}, []
    for kind, rows in heldout.splits.items():
        scores = row_logprobs(model, rows, pad, cfg.batch_size, runtime.device)
        loss, tokens = mean_loss(scores)
        splits[kind] = {"rows": len(rows), "tokens": tokens, "loss": loss, "perplexity": perplexity(loss)}
        if kind == heldout.kind:
            row_scores = scores
    preference = preference_scores(model, heldout.pairs, pad, cfg.batch_size, runtime.device) if heldout.pairs else []
    feedback = feedback_scores(model, heldout.feedback, pad, cfg.batch_size, runtime.device) if heldout.feedback else []
    sft = heldout.splits.get("sft") if cfg.check_relevance else None
    dependence = prompt_dependence(model, sft, pad, cfg.batch_size, runtime.device) if sft else []
    scored = time.perf_counter()
    answers = answer_prompts(model, tokenizer, prompts, cfg, eot_ids, runtime.device, untemplated, label)
    seconds = {"scoring": scored - started, "generation": time.perf_counter() - scored}
    primary = splits[heldout.kind]
    return {"loss": primary["loss"], "perplexity": primary["perplexity"], "tokens": primary["tokens"], "splits": splits,
            "row_scores": row_scores, "preference": preference, "feedback": feedback, "prompt_dependence": dependence, "answers": answers, "seconds": seconds, **sample_summary(answers)}


def settings_of(cfg: EvaluateConfig, runtime: Runtime) -> dict:
    """What changes the numbers besides the data (batch sizes do not)."""
    return {"samples": cfg.samples, "max_new_tokens": cfg.max_new_tokens, "repeat_ngram": cfg.repeat_ngram,
            "do_sample": cfg.do_sample, "temperature": cfg.temperature if cfg.do_sample else None,
            "bootstrap": [cfg.bootstrap_resamples, cfg.confidence, cfg.bootstrap_seed], "precision": runtime.precision}
