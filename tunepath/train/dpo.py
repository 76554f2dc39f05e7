"""DPO on the tokenize stage's preference pairs: sigmoid loss, reference log-probs computed once up front.

Why not trl's `DPOTrainer`: trl 1.15 patches the model with a fused LM-head loss that calls a Triton kernel
unconditionally, so it cannot run on a CPU-only torch ('NoneType' object has no attribute 'apply'; checked on
CPU with the pinned trl), and it re-tokenizes the rendered strings, which would undo the tokenize stage's
injection guard. The loss is small enough to own (Rafailov et al. 2023, eq. 7):

    loss = -log σ(β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

The reference is the model as it stands when the DPO stage starts, i.e. after the plan's earlier stages (SFT
before DPO), not the untouched base: its log-probs are computed once, before the first step, from the same
weights (a LoRA adapter keeps training across plan stages, so the adapter-disabled model would be the
pre-SFT base, the wrong reference). No second model is kept in memory. On resume the stage's start weights
are rebuilt first (earlier stages resume from their final checkpoints), so the reference is the same.

Rows are padded on the right as their own segment (`PadCollator`); under a causal mask no answer token sees
padding, so the same batches are right for the unsloth backend too.
"""

from __future__ import annotations

import logging

from tunepath.collate import IGNORE_INDEX, PadCollator

log = logging.getLogger(__name__)

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class PairCollator:
    """Each pair becomes two rows, prompt+chosen and prompt+rejected (labels only on the answer): chosen rows
    first, then rejected rows. Reference log-probs ride along when the rows carry them."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = PadCollator(pad_token_id)

    def __call__(self, pairs: list[dict]) -> dict:
        import torch

        rows = []
        for side in ("chosen_ids", "rejected_ids"):
            for p in pairs:
                prompt, answer = list(p["prompt_ids"]), list(p[side])
                rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
        batch = self.pad(rows)
        if all(c in pairs[0] for c in REF_COLUMNS):
            batch["ref_logps"] = torch.tensor([p[REF_COLUMNS[0]] for p in pairs] + [p[REF_COLUMNS[1]] for p in pairs], dtype=torch.float32)
        return batch


def sequence_logps(model, batch: dict):
    """Sum of log-probabilities of each row's label tokens, shape [rows], in fp32."""
    import torch

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1)


def preference_loss(policy_logps, ref_logps, beta: float) -> tuple:
    """Sigmoid DPO loss over a batch laid out as [chosen..., rejected...]; returns (loss, metrics)."""
    import torch.nn.functional as F

    n = policy_logps.shape[0] // 2
    chosen = beta * (policy_logps[:n] - ref_logps[:n])
    rejected = beta * (policy_logps[n:] - ref_logps[n:])
    loss = -F.logsigmoid(chosen - rejected).mean()
    metrics = {
        "dpo_reward_margin": float((chosen - rejected).mean().detach()),
        "dpo_reward_accuracy": float((chosen > rejected).float().mean().detach()),
    }
    return loss, metrics


def reference_logps(model, dataset, collator: PairCollator, batch_size: int, device, precision: str) -> tuple[list, list]:
    """Log-probs of chosen and rejected answers under `model` as it is now (eval mode, no gradients)."""
    import torch

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    with torch.no_grad(), autocast:
        for start in range(0, len(columns), batch_size):
            part = columns[start : start + batch_size]
            pairs = [dict(zip(part, values)) for values in zip(*part.values())]
            batch = {k: v.to(device) for k, v in collator(pairs).items()}
            logps = sequence_logps(model, batch).cpu().tolist()
            chosen += logps[: len(pairs)]
            rejected += logps[len(pairs):]
    model.train(was_training)
    return chosen, rejected


def build_trainer(model, args, dataset, tokenizer, beta: float, precision: str, callbacks: list):
    """A Trainer whose loss is DPO's; the dataset gets the reference log-probs as two extra columns."""
    from transformers import Trainer

    class PreferenceTrainer(Trainer):
        """Overrides only the loss, and adds the DPO reward metrics to the logs."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            # the loss below is a mean per pair: let the Trainer divide it over accumulation steps
            self.model_accepts_loss_kwargs = False
            self._dpo_metrics: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, metrics = preference_loss(sequence_logps(model, inputs), inputs["ref_logps"], beta)
            for k, v in metrics.items():
                self._dpo_metrics.setdefault(k, []).append(v)
            return (loss, None) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs and self._dpo_metrics:
                logs.update({k: sum(v) / len(v) for k, v in self._dpo_metrics.items()})
                self._dpo_metrics = {}
            super().log(logs, start_time)

    collator = PairCollator(tokenizer.pad_token_id)
    trainer = PreferenceTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer, callbacks=callbacks
    )
    # the Trainer has put the model on its device; the reference is this model before any DPO step
    chosen, rejected = reference_logps(trainer.model, dataset, collator, args.per_device_train_batch_size, args.device, precision)
    trainer.train_dataset = dataset.add_column(REF_COLUMNS[0], chosen).add_column(REF_COLUMNS[1], rejected)
    log.info("dpo: reference log-probs of %d pairs computed from the model at the start of the stage", len(chosen))
    return trainer
