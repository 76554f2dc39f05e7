"""The one typed configuration: a section per `params.yaml` key, loaded once at the entry point."""

from __future__ import annotations

import warnings

from pydantic import Field

from tunepath.demo import DemoConfig
from tunepath.evaluate import EvaluateConfig
from tunepath.merge import MergeConfig
from tunepath.promote import PromoteConfig
from tunepath.register import RegisterConfig
from tunepath.route import RouteConfig
from tunepath.sections import DataConfig, ModelConfig
from tunepath.strict import Strict
from tunepath.tokenize import TokenizeConfig
from tunepath.train import TrainConfig
from tunepath.validate import ValidateConfig

STAGES = ("validate", "tokenize", "route", "train", "evaluate", "merge", "register")

with warnings.catch_warnings():
    # `validate` and `register` are stage names in params.yaml and dvc.yaml; shadowing BaseModel.validate
    # (deprecated) and ABCMeta.register on an instance is harmless.
    warnings.filterwarnings("ignore", message='Field name "(validate|register)"')

    class Config(Strict):
        """Everything a tunepath run depends on. Mirrors params.yaml; unknown keys are errors."""

        data: DataConfig = Field(default_factory=DataConfig, description="Input data.")
        model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
        demo: DemoConfig = Field(default_factory=DemoConfig, description="The bundled demo model and data (`tunepath demo`).")
        validate: ValidateConfig = Field(default_factory=ValidateConfig, description="Data contracts and quarantine.")
        tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Chat template, masks, packing.")
        route: RouteConfig = Field(default_factory=RouteConfig, description="Scenario rules choosing stages and method.")
        train: TrainConfig = Field(default_factory=TrainConfig, description="Training hyper-parameters.")
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Held-out evaluation and gates.")
        merge: MergeConfig = Field(default_factory=MergeConfig, description="Adapter merge and parity checks.")
        register: RegisterConfig = Field(default_factory=RegisterConfig, description="MLflow registration.")
        promote: PromoteConfig = Field(default_factory=PromoteConfig, description="When `tunepath promote` moves `champion` to the candidate.")
