"""The merge stage: fold the LoRA adapter into the base weights and package a standalone model folder."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunepath.strict import Strict


class MergeConfig(Strict):
    """How the adapter is merged and how closely the merged model must match base + adapter."""

    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Merge dtype: auto is bf16 on a GPU, fp32 on CPU.")
    parity_rows: int = Field(8, ge=1, description="Held-out rows whose logits are compared, merged vs base + adapter.")
    parity_tolerance: float = Field(
        1e-3, gt=0, description="Largest allowed max|merged - adapter| / max|adapter| over the compared logits (fp32)."
    )
