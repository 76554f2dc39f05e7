"""The merge stage: fold the LoRA adapter into the base weights and package a standalone model folder.

Outputs in `artifacts/merge/`: `model/` (safetensors, config, generation config whose stop tokens include the
template's end-of-turn token, tokenizer with the training chat template) and `parity.json` (the checks below).

Checks, each raising ParityError:
- logits: the merged folder, reloaded, against base + adapter computed by peft in fp32 (merge arithmetic, dtype);
- evaluated: the merged model's per-row held-out log-likelihood against what the evaluate stage measured for the
  tuned model (`row_scores.json`): the registered weights are the weights that passed the gates, and an adapter
  changed or a base rebuilt after evaluation is caught;
- template: one golden conversation rendered by the merged folder's tokenizer gives the ids training used.
A QLoRA adapter is merged into the base loaded unquantized (bf16 on GPU), never into 4-bit weights; on a GPU
with bitsandbytes, parity.json also says how far the merged model is from the 4-bit base + adapter it trained as.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunepath.strict import Strict


class MergeConfig(Strict):
    """How the adapter is merged and how closely the merged model must match base + adapter."""

    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Merge dtype: auto is bf16 on a GPU, fp32 on CPU.")
    parity_rows: int = Field(8, ge=1, description="Held-out rows whose logits are compared, merged vs base + adapter.")
    parity_tolerance: float = Field(
        1e-3, gt=0, description="fp32 merge: largest allowed max|merged - adapter| / max|adapter| over the compared logits (measured ~1e-6)."
    )
    parity_tolerance_bf16: float = Field(
        0.15, gt=0, description="bf16 merge: the same bound; rounding the merged weights to bf16 moves logits by a few percent."
    )
    evaluated_tolerance: float = Field(
        0.01, gt=0, description="Largest allowed relative difference of a row's held-out loss, merged model vs the tuned model the evaluate stage scored."
    )
