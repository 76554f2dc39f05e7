"""The register stage: log the run and the merged model to MLflow and register a version with alias `candidate`."""

from __future__ import annotations

from pydantic import Field

from tunepath.strict import Strict


class RegisterConfig(Strict):
    """Where and under which name the model is registered."""

    model_name: str = Field("tunepath-demo", min_length=1, description="Registered model name in the MLflow registry.")
    experiment: str = Field("tunepath", min_length=1, description="MLflow experiment that holds the runs.")
    alias: str = Field("candidate", min_length=1, description="Alias set on the new version; promotion moves `champion`.")
