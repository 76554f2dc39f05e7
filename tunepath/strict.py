"""The base of every configuration model: unknown keys are errors, values are validated on assignment."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A pydantic model that rejects unknown keys (a typo in params.yaml must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
