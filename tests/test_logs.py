"""Quiet, single logs: each DVC message once, expected library warnings and progress lines off the terminal, a
user's error without its traceback; progress lines with ETA and tokens/s where no bar shows."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap

from tests.conftest import REPO

ONCE = """
    import logging, sys
    from tunepath import logs
    logs.setup()
    import dvc.repo  # DVC adds its own console handlers to its loggers on import
    if sys.argv[1] == "adopted":
        logs.adopt_dvc_loggers()
    logging.getLogger("dvc_data.index.fetch").warning("Some of the cache files do not exist neither locally nor on remote")
"""


def _python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_a_dvc_message_prints_once_not_through_dvc_and_tunepath_both():
    before = _python(ONCE, "as imported")
    after = _python(ONCE, "adopted")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    message = "Some of the cache files do not exist"
    assert (before.stdout + before.stderr).count(message) == 2  # the cause: DVC's handler and the root handler
    assert (after.stdout + after.stderr).count(message) == 1


def test_a_fresh_clone_pushes_its_data_without_cache_warnings(tmp_path):
    """The committed dvc.lock names pipeline outputs no fresh clone has; `tunepath demo` pushes the data only."""
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "remote", "add", "-q", "-d", "local", str(tmp_path / "remote")]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    code = """
        import sys
        from pathlib import Path
        from tunepath import logs
        logs.setup()
        from tunepath.cli import track_data
        track_data(Path.cwd(), "data/raw")
        if sys.argv[1] == "all":
            from dvc.repo import Repo
            with Repo(".") as repo:
                repo.push()  # what `tunepath demo` did before: every output dvc.lock names
    """
    data_only = _python(code, "data", cwd=root)
    assert data_only.returncode == 0, data_only.stderr
    assert "cache files do not exist" not in data_only.stdout + data_only.stderr
    assert (tmp_path / "remote").is_dir()  # the data did go to the remote
    everything = _python(code, "all", cwd=root)
    assert (everything.stdout + everything.stderr).count("cache files do not exist") == 1


def test_a_user_error_loses_its_traceback_and_a_bug_keeps_it():
    from tunepath.errors import StageError
    from tunepath.logs import UserErrorsInOneLine

    def record(e):
        try:
            raise e
        except Exception:
            return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed with exception: %r",
                                     (e,), sys.exc_info())

    user, bug = record(StageError("evaluation gate failed (primary: ...)")), record(KeyError("oops"))
    keep = UserErrorsInOneLine()
    assert keep.filter(user) and keep.filter(bug)
    assert user.exc_info is None and "evaluation gate failed" in user.getMessage()
    assert bug.exc_info is not None
    assert "Traceback" in logging.Formatter().format(bug) and "Traceback" not in logging.Formatter().format(user)


def test_the_terminal_leaves_out_progress_lines_expected_warnings_and_prefect_failure_records():
    from tunepath.logs import Terminal

    def record(name, message, **extra):
        r = logging.LogRecord(name, logging.INFO, __file__, 1, message, (), None)
        r.__dict__.update(extra)
        return r

    cli, worker = Terminal(cli_reports_errors=True), Terminal(cli_reports_errors=False)
    assert not cli.filter(record("tunepath.train.tracking", "train sft: 3/60 steps", progress_bar=True))
    assert cli.filter(record("tunepath.train.tracking", "train sft: 3/60 steps", progress_bar=False))
    assert not cli.filter(record("prefect.task_runs", "Concurrency limits ['gpu'] do not exist - skipping acquisition."))
    assert not cli.filter(record("prefect.task_runs", "Finished in state Completed()"))
    assert not cli.filter(record("dvc.output", "'artifacts/checkpoints/train' is empty."))
    failed = record("prefect.task_runs", "Task run failed with exception: StageError('gate')")
    assert not cli.filter(failed) and worker.filter(failed)  # a worker has no CLI to say it: Prefect's line stays
    assert cli.filter(record("prefect.flow_runs", "Beginning flow run 'steel-bobcat' for flow 'finetune'"))
    hint = record("py.warnings", "/x/mlflow/pyfunc/utils/data_validation.py:187: UserWarning: \x1b[33mAdd type hints to "
                                 "the `predict` method to enable data validation")
    assert not cli.filter(hint) and cli.filter(record("py.warnings", "/x/y.py:1: UserWarning: something else"))
    server = record("prefect", "Starting temporary server on http://127.0.0.1:8041\nSee https://www.prefect.io/docs/v3/concepts/server")
    assert cli.filter(server) and server.getMessage() == "Starting temporary server on http://127.0.0.1:8041"


def test_progress_lines_say_count_eta_and_tokens_per_second(caplog):
    from tunepath.progress import Progress

    with caplog.at_level(logging.INFO, logger="tunepath.progress"):
        with Progress(100, "evaluate: tuned answers", unit="prompt", lines=10, bar=False) as progress:
            for _ in range(100):
                progress.update(1, tokens=50, loss=0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "tunepath.progress"]
    assert 10 <= len(lines) <= 12
    assert lines[0].startswith("evaluate: tuned answers: 1/100 prompts (1%)") and "ETA" in lines[0]
    assert lines[-1].startswith("evaluate: tuned answers: 100/100 prompts (100%)") and "ETA" not in lines[-1]
    assert all("tokens/s" in line and "loss 0.5" in line for line in lines)
    assert not any(getattr(r, "progress_bar", True) for r in caplog.records if r.name == "tunepath.progress")


def test_a_bar_on_a_terminal_keeps_its_lines_for_the_log_only():
    # in a fresh interpreter: what earlier tests of this process did to logging must not decide the outcome
    import json

    script = textwrap.dedent("""
        import json, logging
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(bool(getattr(record, "progress_bar", False)))
        logging.getLogger().addHandler(Keep())
        logging.getLogger().setLevel(logging.INFO)
        from tunepath.progress import Progress
        with Progress(5, "train sft (1/1)", bar=True) as progress:
            for _ in range(5):
                progress.update(1, tokens_per_second=1234.0)
        print(json.dumps(records))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "train sft (1/1)" in out.stderr and "5/5" in out.stderr and "1,234 tokens/s" in out.stderr  # tqdm's bar, with the rate
    records = json.loads(out.stdout.strip().splitlines()[-1])
    assert records and all(records)  # every line is marked for the log only: the Terminal filter keeps it off the screen


def test_tunepath_lines_reach_the_flow_runs_logs_where_prefects_root_logger_is_at_warning():
    """Under a Prefect worker the root logger is Prefect's, at WARNING: tunepath's INFO lines (a working copy, a
    stage restored from the run cache, a landed experiment) reach the flow run's Logs tab all the same."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from tunepath import logs

    @task
    def make():
        logging.getLogger("tunepath.ledger").info("make: restored from DVC's run cache, skipped")

    @flow
    def probe():
        logs.setup(cli_reports_errors=False)  # as the finetune flow does
        logging.getLogger("tunepath.isolate").info("landed as DVC experiment probe")
        make()

    ours = logging.getLogger("tunepath")
    level = ours.level
    ours.setLevel(logging.NOTSET)  # as in a fresh worker process: no earlier test's setup
    try:
        assert logging.getLogger().getEffectiveLevel() >= logging.WARNING  # Prefect's root, as in a worker
        state = probe(return_state=True)
        APILogHandler().flush()
    finally:
        ours.setLevel(level)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    lines = {(log.name, log.task_run_id is not None, log.message) for log in found}
    assert ("tunepath.isolate", False, "landed as DVC experiment probe") in lines, lines
    assert ("tunepath.ledger", True, "make: restored from DVC's run cache, skipped") in lines, lines
