"""The train stage: runs the stages and method of the RoutePlan on the tokenized data."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from tunepath.strict import Strict

DEFAULT_MICRO_BATCH_TOKENS = 8192  # train.micro_batch_tokens auto without a route plan (measured in benchmarks/README.md)
DPO_AFTER_SFT_LR_DIVISOR = 10  # train.dpo_learning_rate auto after an SFT stage (why: its description)
# a run of 10 million optimizer steps already takes weeks on one GPU; beyond it is a typo (1e23), not a plan
MAX_STEPS_CEILING = 10_000_000


class TrainConfig(Strict):
    """How to train. The route plan decides what (stages) and how (full/LoRA/QLoRA); this section tunes it."""

    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="auto: unsloth for QLoRA when CUDA and unsloth are present, else hf (transformers + peft with "
        "tunepath's speed paths, measured faster than unsloth for LoRA and full fine-tuning; see benchmarks/README.md).",
    )
    seed: int = Field(0, description="Seed for initialisation and data order; same seed, data and machine give the same loss curve.")
    max_steps: int = Field(
        60, ge=-1, le=MAX_STEPS_CEILING,
        description=f"Optimizer steps per training stage (at most {MAX_STEPS_CEILING:,}); -1 trains for `epochs` instead.")
    epochs: float = Field(1.0, gt=0, le=10_000, description="Passes over the data when max_steps is -1 (at most 10,000).")
    batch_size: int = Field(8, ge=1, description="Rows per device per step (packed rows hold several samples).")
    grad_accum: int = Field(1, ge=1, description="Steps accumulated per optimizer step; raises the effective batch without memory.")
    learning_rate: float = Field(2e-3, gt=0, allow_inf_nan=False, description="Peak learning rate; LoRA tolerates about 10x what full fine-tuning does.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: float = Field(0.1, ge=0, description="Warm-up: a share of all steps when below 1, else a step count.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    lora_r: int = Field(16, ge=1, description="LoRA rank; higher learns more and costs more memory.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input; regularises small data sets.")
    target_modules: str | list[str] = Field(
        "all-linear", min_length=1,
        description="Layers that get adapters: 'all-linear' or a non-empty list of module names (checked against the model's).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA; a little better, slower.")
    lora_train_embeddings: bool = Field(
        False,
        description="LoRA/QLoRA: also train the input embeddings and the LM head in full (for continued pretraining on "
        "new vocabulary or style); the adapter then holds copies of both, which costs memory and disk.",
    )
    dpo_learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["auto"] = Field(
        "auto", description="DPO's peak learning rate. auto: train.learning_rate / 10 when DPO follows SFT in the same "
        "plan (preference tuning should nudge the SFT model, not retrain it: TRL's and published DPO recipes run 10-100x "
        "below SFT's rate), else train.learning_rate.",
    )
    dpo_beta: float = Field(0.1, gt=0, description="DPO: how strongly the policy is held to the reference (the model before DPO); lower lets it drift further.")
    kto_beta: float = Field(0.1, gt=0, description="KTO: how strongly the policy is held to the reference (the model before KTO); lower lets it drift further.")
    kto_desirable_weight: float = Field(
        1.0, gt=0, description="KTO: loss weight of desirable answers; raise it when they are the rarer kind (trl: aim for weight × count about equal)."
    )
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: loss weight of undesirable answers.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward: less memory, about 25% slower. auto: the route plan "
        "decides (on when nothing fits without it); without a plan, off.",
    )
    checkpoint_offload: bool | Literal["auto"] = Field(
        "auto", description="With gradient checkpointing, keep each decoder layer's saved input in CPU memory until its "
        "backward (as unsloth's checkpointing does): less GPU memory, about 15% slower; hf backend. auto: the route "
        "plan decides (on only when nothing fits without it); without a plan, off.",
    )
    micro_batch_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="Split each batch into micro-batches of at most this many tokens (rows x max_length) and "
        "accumulate their gradients: the same optimizer steps in less memory. 0: never split. auto: the route plan "
        "decides (the fastest that fits the GPU); without a plan, 8192.",
    )
    attention: Literal["auto", "sdpa", "varlen"] = Field(
        "auto", description="auto: varlen (packed samples through torch's varlen flash kernel, no mask) on CUDA, else sdpa; hf backend.",
    )
    chunked_loss: bool = Field(True, description="LM head and cross-entropy in chunks on labelled tokens only: no full logits tensor in memory; hf backend.")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer: steps about 1.5x faster after about 20 s of compiling; auto: on a CUDA GPU "
        "for runs of 200 steps or more (or by epochs); hf backend.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs that support it, else fp32.")
    save_steps: int = Field(50, ge=0, description="Checkpoint every N steps (and at the end of each plan stage) so a killed run resumes; 0 keeps no checkpoints.")
    checkpoint_limit: int = Field(2, ge=1, description="Complete checkpoints kept per plan stage while training; older ones are deleted.")
    keep_checkpoints: bool = Field(
        False, description="Keep the checkpoints after a successful run (a rerun with the same inputs then finishes at once); they hold optimizer state."
    )
    logging_steps: int = Field(1, ge=1, description="Log loss, learning rate, grad norm and tokens/s every N steps.")
    num_processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Processes (GPUs) for accelerate launch; auto: one per visible GPU; 1 trains in this process."
    )

    def for_stage(self, stage: str, stages: list[str]) -> "TrainConfig":
        """This config as one plan stage trains with it: DPO's own learning rate (see dpo_learning_rate)."""
        if stage != "dpo":
            return self
        lr = self.dpo_learning_rate
        if lr == "auto":
            lr = self.learning_rate / DPO_AFTER_SFT_LR_DIVISOR if "sft" in stages[:stages.index(stage)] else self.learning_rate
        return self.model_copy(update={"learning_rate": lr})

    def resolved(self, plan_train: dict | None = None) -> "TrainConfig":
        """This config with the `auto` knobs set: from the route plan's `train` section, else the defaults."""
        chosen = plan_train or {}
        update = {}
        if self.gradient_checkpointing == "auto":
            update["gradient_checkpointing"] = bool(chosen.get("gradient_checkpointing", False))
        if self.checkpoint_offload == "auto":
            update["checkpoint_offload"] = bool(chosen.get("checkpoint_offload", False))
        if self.micro_batch_tokens == "auto":
            update["micro_batch_tokens"] = int(chosen.get("micro_batch_tokens", DEFAULT_MICRO_BATCH_TOKENS))
        return self.model_copy(update=update) if update else self

    @model_validator(mode="after")
    def _check_steps(self) -> "TrainConfig":
        if self.max_steps == 0:
            raise ValueError("train.max_steps: 0 trains nothing; use -1 to train by epochs or a positive step count")
        return self
