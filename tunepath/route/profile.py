"""The profile the route rules read: data counts, resources, model size, intent.

The route stage builds it from the tokenize stage's stats, the detected GPUs and params; `tunepath route
--profile FILE` reads it from YAML or JSON:

    data:      {labeled_examples: 400, unlabeled_tokens: 40000, preference_pairs: 200, feedback_examples: 0}
    resources: {gpus: 1, gpu_memory_gb: 24, time_budget_hours: 12}
    model:     {params_b: 7, has_chat_variant: true}
    intent:    {goal: auto, strict_grounding: false, style_required: false}
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from tunepath.route.config import Goal
from tunepath.strict import Strict


class ProfileError(ValueError):
    """A profile file that cannot be read or has a missing or invalid field (the message names the field)."""


class DataProfile(Strict):
    labeled_examples: int = Field(..., ge=0, description="Labelled (SFT) conversations.")
    unlabeled_tokens: int = Field(..., ge=0, description="Tokens of raw domain text.")
    preference_pairs: int = Field(..., ge=0, description="Chosen/rejected answer pairs.")
    feedback_examples: int = Field(0, ge=0, description="Unpaired feedback: answers labelled desirable or undesirable (KTO).")
    labeled_tokens: int | None = Field(
        None, ge=0, description="Tokens in the labelled conversations; None: labeled_examples × route.tokens_per_example."
    )


class ResourceProfile(Strict):
    gpus: int = Field(..., ge=0, description="GPU count; 0 means CPU only.")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory per GPU in GB (1e9 bytes); required when gpus > 0.")
    time_budget_hours: float | None = Field(None, gt=0, description="Wall-clock hours available for training.")

    @model_validator(mode="after")
    def _memory_with_gpus(self) -> "ResourceProfile":
        if self.gpus > 0 and self.gpu_memory_gb is None:
            raise ValueError("gpu_memory_gb: required when gpus > 0")
        return self


class ModelProfile(Strict):
    params_b: float = Field(..., gt=0, description="Parameters in billions.")
    has_chat_variant: bool = Field(False, description="An instruct/chat variant of the base exists to start from.")
    hidden_size: int | None = Field(None, ge=1, description="Hidden size; None: derived from params_b (see memory.py).")
    num_layers: int | None = Field(None, ge=1, description="Decoder layers; None: derived from params_b.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width; None: 8/3 × hidden_size.")
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size; None: 32,000.")
    tied_embeddings: bool | None = Field(
        None, description="The LM head is the input embedding (tie_word_embeddings); None: untied, two V×h matrices.")


class IntentProfile(Strict):
    goal: Goal = Field("auto", description="What the training is for; auto derives it from the data.")
    strict_grounding: bool = Field(False, description="Answers must follow a fixed knowledge source.")
    style_required: bool = Field(False, description="Answers must follow a required format or style.")


class Profile(Strict):
    data: DataProfile
    resources: ResourceProfile
    model: ModelProfile
    intent: IntentProfile = Field(default_factory=IntentProfile)


def describe_validation_error(e: ValidationError, prefix: str = "profile") -> str:
    """One line per problem, each naming the field as `profile.resources.gpus: must be >= 0`."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg, ctx = err["msg"], err.get("ctx") or {}
        kind = err["type"]
        if kind == "missing":
            msg = "is required"
        elif kind == "extra_forbidden":
            msg = "is not a known field"
        elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
            bound = next(iter(ctx.values()), "?")
            msg = f"must be {op} {bound} (got {err.get('input')!r})"
        elif kind == "value_error":
            # Our validators write "field: message"; lift the field into the location.
            text = str(ctx.get("error", msg))
            field, sep, rest = text.partition(": ")
            if sep and " " not in field:
                loc, msg = f"{loc}.{field}" if loc else field, rest
            else:
                msg = text
        lines.append(f"{prefix}.{loc}: {msg}" if loc else f"{prefix}: {msg}")
    return "; ".join(lines)


def parse_profile(raw: object, source: str = "profile") -> Profile:
    """Validate a parsed mapping into a Profile; errors name the field."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: must be a mapping with the parts data, resources, model, intent (got {type(raw).__name__})")
    try:
        return Profile.model_validate(raw)
    except ValidationError as e:
        raise ProfileError(describe_validation_error(e)) from e


def load_profile(path: Path) -> Profile:
    """Read a profile from a YAML (.yaml/.yml) or JSON file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(f"profile: cannot read {path}: {e.strerror or e}") from e
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile: {path} line {e.lineno}: invalid JSON: {e.msg}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"profile: {path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from e
    return parse_profile(raw)
