"""The validate stage: raw files -> canonical records (see `tunepath.records`), quarantined rejects, a report.

Usage (the tasks layer calls the same function):

    from pathlib import Path
    from tunepath.validate import ValidateConfig, run_validate
    summary = run_validate(ValidateConfig(), Path("data/raw"), Path("artifacts/validate"))

Importing this package is cheap: pandas and Great Expectations are imported inside `run_validate`.
"""

from tunepath.validate.config import DataValidationError, LengthBounds, ValidateConfig
from tunepath.validate.stage import run_validate

__all__ = ["DataValidationError", "LengthBounds", "ValidateConfig", "run_validate"]
