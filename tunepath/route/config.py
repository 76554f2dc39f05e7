"""The `route` section of params.yaml: the user's intent, forced routes, and every threshold of the rules.

Each threshold is a documented default, not a law: docs/routing.md explains what each one decides.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunepath.strict import Strict

Stage = Literal["pretrain", "cpt", "sft", "dpo", "kto"]
Method = Literal["full", "lora", "qlora"]
Goal = Literal["auto", "new_model", "domain_knowledge", "task_skill", "grounded_answers", "styled_assistant"]

STAGE_ORDER: tuple[str, ...] = ("pretrain", "cpt", "sft", "dpo", "kto")


class RouteConfig(Strict):
    """How the route stage chooses stages (pretrain, cpt, sft, dpo, kto) and method (full, lora, qlora)."""

    # --- intent -----------------------------------------------------------------------------------------
    goal: Goal = Field(
        "auto",
        description="What the training is for. auto derives it from the data: strict_grounding → grounded_answers, "
        "style_required → styled_assistant, much unlabelled text → domain_knowledge, enough labelled → task_skill.",
    )
    strict_grounding: bool = Field(False, description="Answers must follow a fixed knowledge source (law, manuals): retrieval becomes required.")
    style_required: bool = Field(False, description="Answers must follow a required format or style: adds DPO after SFT when preference pairs exist.")

    # --- forcing ----------------------------------------------------------------------------------------
    force_stages: list[Stage] | None = Field(
        None, description="Run exactly these stages (in pretrain, cpt, sft, dpo, kto order; [] trains nothing). None: the rules decide."
    )
    force_method: Method | None = Field(None, description="Use this method whatever the memory estimate says. None: the rules decide.")

    # --- resources (None: detect) -----------------------------------------------------------------------
    gpus: int | None = Field(None, ge=0, description="GPUs to plan for; None detects them with torch.cuda; 0 plans for CPU.")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory per GPU in GB (1e9 bytes); None detects it (the smallest card).")
    time_budget_hours: float | None = Field(None, gt=0, description="Wall-clock hours you can spend training; None: no limit.")
    params_b: float | None = Field(
        None, gt=0, description="Model size in billions of parameters; None counts it from model.base's config.json (no weights loaded)."
    )

    # --- data thresholds --------------------------------------------------------------------------------
    sft_min_examples: int = Field(100, ge=1, description="Labelled examples needed before SFT is worth running (fewer: prompt or retrieve instead).")
    base_min_examples: int = Field(
        10_000, ge=1, description="Labelled examples from which SFT starts from the base model; fewer start from the chat variant when there is one."
    )
    cpt_min_tokens: int = Field(10_000_000, ge=1, description="Unlabelled tokens needed before continued pretraining is worth running.")
    cpt_min_ratio: float = Field(
        10.0, gt=0, description="goal auto: CPT only when unlabelled tokens are also at least this many times the labelled tokens."
    )
    dpo_min_pairs: int = Field(100, ge=1, description="Preference pairs needed before a DPO stage is worth running.")
    kto_min_examples: int = Field(
        100, ge=1, description="Unpaired feedback examples (answers judged good or bad) needed for a KTO stage when there are too few pairs for DPO."
    )
    tokens_per_example: int = Field(
        512, ge=1, description="Assumed tokens per labelled example or preference answer when the tokenize stats give no labeled_tokens."
    )
    pretrain_tokens_per_param: float = Field(
        20.0, gt=0, description="Unlabelled tokens per parameter that pretraining from scratch needs (Chinchilla: about 20)."
    )
    pretrain_max_hours: float = Field(
        720.0, gt=0, description="Longest pretraining run (hours) that still counts as ample compute when time_budget_hours is not set."
    )

    # --- memory and time estimate -----------------------------------------------------------------------
    weight_bytes: float = Field(2.0, gt=0, description="Bytes per model weight as loaded for training (2: bf16).")
    grad_bytes: float = Field(2.0, gt=0, description="Bytes per gradient in full fine-tuning (2: bf16).")
    optimizer_bytes_per_param: float = Field(
        12.0, ge=0, description="Optimizer bytes per trained parameter (12: AdamW fp32 master copy + 2 moments; 4 if the moments stay in bf16 with no master copy)."
    )
    activation_factor: float | None = Field(
        None, gt=0, description="Activation bytes stored per token, per layer, per hidden unit with compiled layers; None: 20 + 5.7 × intermediate/hidden "
        "(fitted to the GPU benchmark's peaks; other training paths scale it, see route/memory.py)."
    )
    overhead_gb: float = Field(1.0, ge=0, description="Fixed per-GPU memory for the CUDA context, kernels and workspaces.")
    headroom: float = Field(0.1, ge=0, lt=1, description="Share of each GPU's memory kept free for fragmentation and spikes.")
    gpu_tflops: float = Field(
        400.0, gt=0, description="Dense bf16 matmul TFLOP/s of one GPU (a large matmul; the benchmark measures about 790 on an "
        "H200); the measured utilisation of each training path at the model's size turns it into tokens/s (route/speed.py).",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the data assumed by the time estimate.")

    @model_validator(mode="after")
    def _check(self) -> "RouteConfig":
        if self.force_stages is not None:
            if len(set(self.force_stages)) != len(self.force_stages):
                raise ValueError(f"route.force_stages: {self.force_stages} repeats a stage; list each at most once")
            ordered = sorted(self.force_stages, key=STAGE_ORDER.index)
            if ordered != list(self.force_stages):
                raise ValueError(f"route.force_stages: {self.force_stages} is out of order; write it as {ordered}")
        if self.gpus == 0 and self.gpu_memory_gb is not None:
            raise ValueError("route.gpu_memory_gb: set with route.gpus 0 (CPU); remove it or set route.gpus")
        if self.base_min_examples < self.sft_min_examples:
            raise ValueError(
                f"route.base_min_examples ({self.base_min_examples}) is below route.sft_min_examples ({self.sft_min_examples}); "
                "the base model needs more labelled data than the chat variant, not less"
            )
        return self
