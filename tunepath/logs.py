"""What a tunepath process prints: one handler (the root logger's), each message once, library noise left out, a
user's error in one line.

Entry points call `setup` once: the CLI's `main` (`tunepath run`, `tunepath stage` under `dvc repro`, ...) and
the `finetune` flow (a Prefect worker runs it without the CLI). Below them nothing configures logging.

- DVC adds its own console handlers to its loggers when `dvc` is first imported; with the root handler as
  well every DVC message printed twice. `adopt_dvc_loggers` (called right after importing DVC) removes DVC's
  handlers, so its records reach the terminal once, through the root handler, at WARNING and above.
- A user's error (`tunepath.errors.USER_ERRORS`, or a fault `explain_fault` names) loses its traceback in
  Prefect's records too (the UI shows one line), unless `debug` (TUNEPATH_DEBUG=1). Under the CLI, which prints
  the error itself at the end, Prefect's three failure records per failed stage stay off the terminal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")

LEVELS = {
    "httpx": logging.WARNING,  # one line per request to the Prefect API
    "httpcore": logging.WARNING,
    "alembic": logging.WARNING,
    "urllib3": logging.WARNING,
    # DVC's INFO lines ("Updating lock file 'dvc.lock'", "To track the changes with git") repeat tunepath's own
    **dict.fromkeys(DVC_LOGGERS, logging.WARNING),
    "great_expectations": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..." on a new mlflow.db
    "lm_eval": logging.ERROR,  # INFO per task, and warnings about the in-memory model tunepath hands it on purpose
    "matplotlib": logging.WARNING,  # "generated new fontManager" on the first plot
    "gguf": logging.WARNING,  # the GGUF writer's INFO line per file part and header; `tunepath export` says what it wrote
}

# (logger prefix, message start): expected warnings that ask nothing of the user
DROPPED = (
    ("prefect", "Concurrency limits ['gpu'] do not exist"),  # a temporary server has no limits; training goes on
    ("prefect.task_runs", "Finished in state Completed("),  # the next stage's line says as much
    ("dvc.output", "'artifacts/checkpoints/train' is empty"),  # checkpoints are cleared after a finished training
    # GX lowers its own logger to INFO when imported: its ephemeral context's folder, on every validate
    ("great_expectations", "Created temporary directory"),
    # tunepath's pyfunc is a class of its own package: its pickle holds no user code to be careful about
    ("mlflow.pyfunc", "Passing a Python object as `python_model`"),
)
# Python warnings (as regular expressions on the message) that say nothing a tunepath user can act on
WARNINGS = (
    r"(\x1b\[[0-9;]*m)?Add type hints to the `predict` method",  # tunepath's pyfunc takes chat requests, not DataFrames
    r"(\x1b\[[0-9;]*m)?An input example was not provided when logging the model",
    r"pkg_resources is deprecated",  # setuptools, imported by some libraries' plugin lookup
    r"Setuptools is replacing distutils",
    r".*`resume_download` is deprecated",
)
PREFECT_FAILURES = ("Task run failed with exception", "Encountered exception during execution",
                    "Finished in state Failed(", "Task run failed with state", "Flow run failed")

# Bars of libraries: transformers' "Loading weights" (a second, every load), datasets' ("Saving the dataset" per
# split, "Generating test split" per benchmark file, map bars whose blank lines stay behind). tunepath's own bars
# (tunepath.progress) say what the long steps do.
# MLflow's "Downloading artifacts" bar when the register stage reads the logged model back.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def is_user_error(e: BaseException | None) -> bool:
    from tunepath.errors import USER_ERRORS, explain_fault

    return e is not None and (isinstance(e, USER_ERRORS) or explain_fault(e) is not None)


class UserErrorsInOneLine(logging.Filter):
    """Drops the traceback of a record whose exception is the user's to fix (its message says what)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


class Expected(logging.Filter):
    """Drops the DROPPED records of a logger that prints through a handler of its own (MLflow's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(prefix) and message.startswith(start) for prefix, start in DROPPED)


class Terminal(logging.Filter):
    """What the terminal leaves out: progress lines while a bar shows them, expected warnings, and (under the
    CLI, which reports the error itself) Prefect's failure records."""

    def __init__(self, cli_reports_errors: bool) -> None:
        super().__init__()
        self.cli_reports_errors = cli_reports_errors

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "progress_bar", False):
            return False
        message = record.getMessage()
        if record.name.startswith("prefect") and "\nSee https://www.prefect.io/docs" in message:
            # "Starting temporary server on ...": its second line is advice for production, not for this run
            record.msg, record.args = message.split("\nSee https://www.prefect.io/docs")[0], ()
        for prefix, start in DROPPED:
            if record.name.startswith(prefix) and message.lstrip().startswith(start):
                return False
        if self.cli_reports_errors and record.name.startswith("prefect") and message.startswith(PREFECT_FAILURES):
            return False
        # MLflow wraps some of its warnings in its own `simplefilter("once")`, past any warnings filter: they are
        # dropped here, as records (setup routes warnings through logging)
        if record.name == "py.warnings" and any(re.search(pattern, message) for pattern in WARNINGS):
            return False
        return True


def setup(debug: bool = False, cli_reports_errors: bool = True) -> None:
    """Configure this process's logging once (an entry point calls it before the libraries are imported)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    if not root.handlers:  # else Prefect's (a worker) or the caller's handler is the one, as it is
        logging.basicConfig(level=logging.INFO, format=FORMAT, stream=sys.stderr)
    for handler in root.handlers:
        if not any(isinstance(f, Terminal) for f in handler.filters):
            handler.addFilter(Terminal(cli_reports_errors))
    for name, level in LEVELS.items():
        logging.getLogger(name).setLevel(level)
    # tunepath's own lines (working copies, reused stages, landed experiments) are INFO. Under a Prefect worker
    # the root logger is Prefect's, at WARNING: left unset, they never reached the flow run's Logs tab
    logging.getLogger("tunepath").setLevel(logging.DEBUG if debug else logging.INFO)
    mlflow_pyfunc = logging.getLogger("mlflow.pyfunc")  # MLflow's loggers print through MLflow's handler, not the root's
    if not any(isinstance(f, Expected) for f in mlflow_pyfunc.filters):
        mlflow_pyfunc.addFilter(Expected())
    if not debug:
        for name in ("prefect.task_runs", "prefect.flow_runs", "tunepath"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, UserErrorsInOneLine) for f in logger.filters):
                logger.addFilter(UserErrorsInOneLine())
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.captureWarnings(True)
    if "dvc" in sys.modules:
        adopt_dvc_loggers()


def adopt_dvc_loggers() -> None:
    """After `import dvc`: its records go through the root handler only (once), at WARNING and above."""
    import dvc.logger

    for name in DVC_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, dvc.logger.LoggerHandler)]
        logger.setLevel(LEVELS[name])
    # DVC's bars ("Committing artifacts/train to cache", one per stage, and its temporary files') show below
    # ERROR only: their leftovers stay on the terminal between tunepath's lines
    logging.getLogger("dvc.progress").setLevel(logging.CRITICAL)
