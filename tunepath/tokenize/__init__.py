"""The tokenize stage: chat templates, SFT label masks, injection-safe tokenization, packing, CPT blocks, DPO pairs.

Usage (Python):

    from pathlib import Path
    from tunepath.sections import ModelConfig
    from tunepath.tokenize import TokenizeConfig, run_tokenize

    run_tokenize(TokenizeConfig(), ModelConfig(base="models/demo"), Path("artifacts/validate"), Path("artifacts/tokenize"))

Outputs (all under `out_dir`): `tokenizer/` (saved with the chat template used), `sft/{train,eval}`,
`cpt/{train,eval}`, `dpo/{train,eval}` (the layout `datasets.load_from_disk` reads, written shard by shard),
`stats.json` and `report.md`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunepath.tokenize.config import TokenizeConfig
    from tunepath.tokenize.stage import run_tokenize

__all__ = ["TokenizeConfig", "run_tokenize"]


def __getattr__(name: str):
    # Deferred: the stage imports datasets and transformers, the config pydantic; `tunepath chat` imports
    # `tunepath.tokenize.render` and needs neither.
    if name == "TokenizeConfig":
        from tunepath.tokenize.config import TokenizeConfig

        return TokenizeConfig
    if name == "run_tokenize":
        from tunepath.tokenize.stage import run_tokenize

        return run_tokenize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
