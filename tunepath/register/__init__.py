"""The register stage: log the run and the merged model to MLflow and register a version with alias `candidate`.

The MLflow run holds the params (flat, and whole as `params.json`), the evaluation metrics, the route plan, the
validation, token, evaluation and parity reports, the held-out data (`heldout/`, so promotion can re-evaluate
any two versions on the same rows), the data lineage (`mlflow.data` inputs carrying the DVC hash) and the
merged model as tunepath's chat pyfunc (`tunepath.serve`): `mlflow.pyfunc.load_model(uri).predict(
{"messages": [...]})` answers a chat, its prompt encoded as in training (control-token text in a message stays
text). The version carries the lineage and evaluation tags; the same merged weights register once (tag
`artifact_hash`).
"""

from __future__ import annotations

from pydantic import Field

from tunepath.strict import Strict


class RegisterConfig(Strict):
    """Where and under which name the model is registered."""

    model_name: str = Field("tunepath-demo", min_length=1, description="Registered model name in the MLflow registry.")
    experiment: str = Field("tunepath", min_length=1, description="MLflow experiment that holds the runs.")
    alias: str = Field("candidate", min_length=1, description="Alias set on the new version; promotion moves `champion`.")
    max_new_tokens: int = Field(256, ge=1, description="Default answer length of the served model; a request may pass max_tokens.")
