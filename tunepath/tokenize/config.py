"""The tokenize stage's settings (`tokenize:` in params.yaml); a module of its own so that importing
`tunepath.tokenize.render` (what `tunepath chat` needs) does not import pydantic."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, model_validator

from tunepath.strict import Strict


class TokenizeConfig(Strict):
    """How records become token ids: template, masks, length policy, packing, parallelism."""

    max_length: int = Field(256, ge=16, le=1_048_576, description="Longest row in tokens (samples, packed rows and CPT blocks).")
    template: Literal["tokenizer", "chatml", "llama2", "custom"] = Field(
        "tokenizer",
        description="Chat template: the tokenizer's own, a built-in (chatml, llama2) or `custom_template`.",
    )
    custom_template: str | None = Field(
        None, description="A Jinja chat template (Hugging Face conventions); only with template: custom."
    )
    pack: bool = Field(True, description="Pack SFT train samples into rows of max_length (best-fit decreasing).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="A sample longer than max_length is cut to max_length (truncate) or left out (drop)."
    )
    last_turn_only: bool = Field(False, description="Learn only the last assistant turn of each conversation.")
    keep_history_reasoning: bool = Field(
        False,
        description="Earlier assistant turns keep their reasoning in the history a later turn sees (where the template "
        "renders it; R1 and Qwen3 drop it anyway). Off: history as inference clients send it, without reasoning.",
    )
    template_kwargs: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Extra variables for the chat template, as apply_chat_template(**kwargs) takes them (e.g. enable_thinking: false).",
    )
    render_date: dt.date = Field(
        dt.date(2024, 7, 26),
        description="The date templates print (Llama-3's 'Today Date'): fixed, so reruns give the same ids; the saved template defaults to it too.",
    )
    max_drop_share: float = Field(
        0.1, ge=0, le=1,
        description="Fail the stage when more than this share of records of one kind and split yields no sample (unrenderable, too long, no labels).",
    )
    parity_checks: int = Field(
        4, ge=0, le=1_000_000,
        description="Samples per batch compared with the tokenizer's own apply_chat_template; a difference fails the stage.",
    )
    cpt_remainder: Literal["drop", "pad", "keep"] = Field(
        "keep", description="The last, short CPT block: drop it, pad it to max_length (labels -100), or keep it short."
    )
    cpt_isolate_documents: bool = Field(
        True, description="Position ids restart at each document inside a CPT block, so documents do not attend to each other."
    )
    batch_size: int = Field(1000, ge=1, le=1_000_000, description="Records per datasets.map batch.")
    cache_dir: str | None = Field(
        None, description="Where tokenized records are cached by input fingerprint; null: the datasets cache folder."
    )
    cache_max_gb: float | None = Field(
        20.0, gt=0, le=1_000_000,
        description="Size bound of the tokenize cache in GB: after a run, least recently used entries are evicted "
                    "down to it (never the run's own); null: no bound.",
    )

    @model_validator(mode="after")
    def _check_template(self) -> TokenizeConfig:
        if self.template == "custom" and not (self.custom_template or "").strip():
            raise ValueError("tokenize.template is 'custom' but tokenize.custom_template is empty; give a Jinja chat template")
        if self.template != "custom" and self.custom_template is not None:
            raise ValueError(
                f"tokenize.custom_template is set but tokenize.template is {self.template!r}; "
                "set template: custom to use it, or remove custom_template"
            )
        return self
