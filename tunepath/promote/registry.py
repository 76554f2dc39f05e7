"""The MLflow registry as promotion sees it: aliases, version tags, the champion history, local model folders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tunepath.registry import set_alias

log = logging.getLogger(__name__)

HISTORY_TAG = "promotion.history"  # registered-model tag: versions that were champion, oldest first


class PromotionError(ValueError):
    """Promotion cannot proceed (no such model, no candidate, nothing to roll back to); the message says what to do."""


@dataclass
class Registry:
    client: object
    name: str

    @classmethod
    def open(cls, name: str, tracking_uri: str) -> "Registry":
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_tracking_uri(tracking_uri)
        return cls(MlflowClient(tracking_uri=tracking_uri), name)

    def model(self):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as e:
            raise PromotionError(
                f"no registered model {self.name!r} in the registry; run `tunepath run` first (it registers a candidate), "
                "or pass --model NAME"
            ) from e

    def alias(self, alias: str):
        """The version an alias points at, or None."""
        version = (self.model().aliases or {}).get(alias)
        return self.client.get_model_version(self.name, str(version)) if version is not None else None

    def point(self, alias: str, version: str) -> None:
        set_alias(self.client, self.name, alias, version)

    def drop(self, alias: str) -> None:
        if alias in (self.model().aliases or {}):
            self.client.delete_registered_model_alias(self.name, alias)

    def tag(self, version: str, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, str(value)[:4900])

    def history(self) -> list[str]:
        text = (self.model().tags or {}).get(HISTORY_TAG, "")
        return [v for v in text.split(",") if v]

    def set_history(self, versions: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, ",".join(versions[-200:]))

    def model_root(self, version: str, scratch: Path) -> Path:
        """The logged model's folder (MLmodel, model/, components/): in place on a local store, else downloaded."""
        import mlflow

        uri = self.client.get_model_version_download_uri(self.name, str(version))
        if uri.startswith("file://"):
            from urllib.parse import unquote, urlparse

            return Path(unquote(urlparse(uri).path))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{self.name}/{version}", dst_path=str(scratch / f"v{version}")))

    def run_artifact(self, run_id: str, path: str, scratch: Path) -> Path:
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(scratch)))
        except Exception as e:  # noqa: BLE001  (each artifact store raises its own error type for a missing file)
            raise PromotionError(f"run {run_id} has no artifact {path!r}: it was not logged by tunepath's register stage") from e


def model_folders(root: Path) -> tuple[Path, Path]:
    """The weights folder and the tokenizer folder inside a logged model: tunepath's chat pyfunc keeps the merged
    folder as an artifact (MLmodel names where); versions logged in the transformers flavour keep `model/` and
    `components/tokenizer/`."""
    import yaml

    mlmodel = root / "MLmodel"
    if mlmodel.exists():
        pyfunc = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")).get("flavors") or {}).get("python_function") or {}
        folder = ((pyfunc.get("artifacts") or {}).get("model") or {}).get("path")
        if folder and (root / folder / "config.json").exists():
            return root / folder, root / folder
    weights = root / "model"
    tokenizer = root / "components" / "tokenizer"
    return weights, tokenizer if (tokenizer / "tokenizer_config.json").exists() else weights
