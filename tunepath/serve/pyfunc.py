"""The MLflow model the register stage logs: the merged model folder as an artifact, answered by `ChatModel`.

Its signature is MLflow's chat signature (the one the transformers flavour gives `llm/v1/chat` models), so
clients send the same requests as before; what changes is the prompt, encoded as in training:

    model = mlflow.pyfunc.load_model("models:/tunepath-demo@champion")
    model.predict({"messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 64})
    mlflow models serve -m models:/tunepath-demo@champion --env-manager local   # POST /invocations {"messages": ...}
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow.pyfunc

ARTIFACT = "model"  # the key of the model folder among the logged artifacts


class TunepathChat(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from tunepath.serve.chat import ChatModel

        config = dict(context.model_config or {})
        self.chat = ChatModel(Path(context.artifacts[ARTIFACT]), name=config.get("name", ""),
                              template_kwargs=config.get("template_kwargs") or {}, render_date=config.get("render_date"),
                              max_new_tokens=int(config.get("max_new_tokens", 256)))

    def predict(self, context, model_input, params: dict | None = None) -> list[dict]:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from tunepath.serve.prompt import PromptError

        try:
            return [self.chat.complete({**(params or {}), **request}) for request in requests_of(model_input)]
        except PromptError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def requests_of(model_input) -> list[dict]:
    """Chat requests from what pyfunc passes: a dict, a list of dicts, or the DataFrame its schema check makes."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        rows = model_input
    else:
        from tunepath.serve.prompt import PromptError

        raise PromptError(f"a chat request is an object with `messages`, not a {type(model_input).__name__}")
    return [{k: _plain(v) for k, v in row.items() if not _missing(v)} for row in rows]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value):
    """numpy arrays and scalars (DataFrame cells) as lists and Python numbers; absent optional fields dropped."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not _missing(v)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def log_chat_model(model_dir: Path, name: str, max_new_tokens: int, template_kwargs: dict, render_date: str,
                   pip_requirements: list[str]):
    """Log `model_dir` as a chat model in the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA

    import tunepath

    return mlflow.pyfunc.log_model(
        name=name, python_model=TunepathChat(), artifacts={ARTIFACT: str(model_dir)},
        code_paths=[str(Path(tunepath.__file__).parent)],  # the encoder travels with the model: serving needs no tunepath install
        signature=ModelSignature(inputs=CHAT_MODEL_INPUT_SCHEMA, outputs=CHAT_MODEL_OUTPUT_SCHEMA),
        model_config={"max_new_tokens": max_new_tokens, "template_kwargs": template_kwargs, "render_date": render_date},
        pip_requirements=pip_requirements,
    )
