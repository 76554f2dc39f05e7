"""The base of every configuration model: unknown keys are errors, values are validated on assignment."""

from pydantic import BaseModel, ConfigDict


def _form_schema(schema: dict, cls) -> None:
    from tunepath.form import form_schema

    form_schema(schema, cls)


class Strict(BaseModel):
    """A pydantic model that rejects unknown keys (a typo in params.yaml must not be silently ignored)."""

    # inf and NaN pass every bound (inf > 0): an infinite learning rate would train on NaN until a gate noticed
    # the JSON schema (Prefect's run form) lists the fields a person changes first and has no unchangeable consts
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, json_schema_extra=_form_schema)
