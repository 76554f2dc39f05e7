"""KTO on the tokenize stage's unpaired feedback: each answer judged desirable or not, no pairs needed.

The loss is trl 1.15's `KTOTrainer` with `loss_type="kto"` (Ethayarajh et al. 2024, eq. 7), written out here
for the reasons `dpo.py` gives for DPO (trl's fused LM-head loss needs Triton, so it cannot run on a CPU-only
torch, and trl re-tokenizes the strings):

    r(x, y) = log π(y|x) - log π_ref(y|x)
    z       = max(0, mean over the batch of [log π(y'|x) - log π_ref(y'|x)])     (detached; y' a mismatched answer)
    loss    = mean of  λ_D · (1 - σ(β (r - z)))   for desirable answers
                       λ_U · (1 - σ(β (z - r)))   for undesirable ones

The mismatched answer y' of row i is the answer of row i-1 (trl cycles answers by one within its map batches;
here over the whole data set, so the pairing does not depend on the batch size). As in `dpo.py`, the reference
is the model at the start of this stage: its log-probs of every answer and every mismatched answer are computed
once, before the first step, and the policy's KL estimate runs without gradients, as in trl.
"""

from __future__ import annotations

import logging

from tunepath.collate import IGNORE_INDEX, PadCollator
from tunepath.train.dpo import sequence_logps

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_logps", "ref_kl_logps")


def with_mismatched_answers(dataset):
    """Each row also gets `kl_completion_ids`: the previous row's answer (the first row gets the last one's)."""
    completions = dataset["completion_ids"]
    return dataset.add_column("kl_completion_ids", [completions[-1], *completions[:-1]])


class FeedbackCollator:
    """Each example becomes two rows, prompt+answer and prompt+mismatched answer (labels on the answer only):
    the answer rows first, then the mismatched ones. Labels and reference log-probs ride along."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = PadCollator(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        rows = []
        for side in ("completion_ids", "kl_completion_ids"):
            for e in examples:
                prompt, answer = list(e["prompt_ids"]), list(e[side])
                rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
        batch = self.pad(rows)
        batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        if all(c in examples[0] for c in REF_COLUMNS):
            batch["ref_logps"] = torch.tensor([e[REF_COLUMNS[0]] for e in examples] + [e[REF_COLUMNS[1]] for e in examples],
                                              dtype=torch.float32)
        return batch


def _half(batch: dict, part: slice) -> dict:
    return {k: batch[k][part] for k in ("input_ids", "labels", "position_ids")}


def feedback_loss(policy_logps, policy_kl_logps, ref_logps, desirable, beta: float, desirable_weight: float,
                  undesirable_weight: float) -> tuple:
    """KTO loss over a batch: per-example log-probs of the answers and of the mismatched answers; returns (loss, metrics)."""
    import torch

    n = policy_logps.shape[0]
    ratios = policy_logps - ref_logps[:n]
    kl = (policy_kl_logps - ref_logps[n:]).mean().clamp(min=0).detach()
    chosen = 1 - torch.sigmoid(beta * (ratios[desirable] - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - ratios[~desirable]))
    loss = torch.cat((desirable_weight * chosen, undesirable_weight * rejected)).mean()
    rewards = (beta * ratios).detach()
    metrics = {"kto_kl": float(kl)}
    if desirable.any():
        metrics["kto_reward_desirable"] = float(rewards[desirable].mean())
    if (~desirable).any():
        metrics["kto_reward_undesirable"] = float(rewards[~desirable].mean())
    return loss, metrics


def reference_logps(model, dataset, collator: FeedbackCollator, batch_size: int, device, precision: str) -> tuple[list, list]:
    """Log-probs of each answer and each mismatched answer under `model` as it is now (eval mode, no gradients)."""
    import torch

    was_training = model.training
    model.eval()
    answers, mismatched = [], []
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    columns = dataset.select_columns(["prompt_ids", "completion_ids", "kl_completion_ids", "label"])
    with torch.no_grad(), autocast:
        for start in range(0, len(columns), batch_size):
            part = columns[start : start + batch_size]
            examples = [dict(zip(part, values)) for values in zip(*part.values())]
            batch = {k: v.to(device) for k, v in collator(examples).items()}
            logps = sequence_logps(model, batch).cpu().tolist()
            answers += logps[: len(examples)]
            mismatched += logps[len(examples):]
    model.train(was_training)
    return answers, mismatched


def build_trainer(model, args, dataset, tokenizer, beta: float, desirable_weight: float, undesirable_weight: float,
                  precision: str, callbacks: list):
    """A Trainer whose loss is KTO's; the dataset gets mismatched answers and the reference log-probs as columns."""
    import torch
    from transformers import Trainer

    class FeedbackTrainer(Trainer):
        """Overrides only the loss, and adds the KTO metrics to the logs."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.model_accepts_loss_kwargs = False  # the loss is a mean per example
            self._kto_metrics: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            n = inputs["desirable"].shape[0]
            policy = sequence_logps(model, _half(inputs, slice(0, n)))
            with torch.no_grad():
                policy_kl = sequence_logps(model, _half(inputs, slice(n, None)))
            loss, metrics = feedback_loss(policy, policy_kl, inputs["ref_logps"], inputs["desirable"], beta,
                                          desirable_weight, undesirable_weight)
            for k, v in metrics.items():
                self._kto_metrics.setdefault(k, []).append(v)
            return (loss, None) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs and self._kto_metrics:
                logs.update({k: sum(v) / len(v) for k, v in self._kto_metrics.items()})
                self._kto_metrics = {}
            super().log(logs, start_time)

    dataset = with_mismatched_answers(dataset)
    desirable = sum(dataset["label"])
    if desirable in (0, len(dataset)):
        log.warning("kto: all %d examples are %s; KTO learns best from both kinds of feedback",
                    len(dataset), "desirable" if desirable else "undesirable")
    collator = FeedbackCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    trainer = FeedbackTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                              processing_class=tokenizer, callbacks=callbacks)
    answers, mismatched = reference_logps(trainer.model, dataset, collator, args.per_device_train_batch_size, args.device, precision)
    trainer.train_dataset = dataset.add_column(REF_COLUMNS[0], answers).add_column(REF_COLUMNS[1], mismatched)
    log.info("kto: reference log-probs of %d examples (%d desirable) computed from the model at the start of the stage",
             len(answers), desirable)
    return trainer
