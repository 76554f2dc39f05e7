"""The `tunepath` command.

    tunepath demo                      # build the demo model and data (if missing) and track the data with DVC
    tunepath run [--set train.max_steps=20 ...]   # the Prefect flow `finetune`, end to end
                                       # (another run here already: in a working copy, as a DVC experiment)
    tunepath promote [--force | --rollback]   # candidate -> champion when better; or roll back
    tunepath stage NAME                # one stage, as `dvc repro` runs it
    tunepath up | down | status        # local Prefect + MLflow servers, a worker and the deployments
    tunepath workspaces [--clean]      # working copies of isolated runs; --clean removes those no run works in
    tunepath chat [--model models:/tunepath-demo@champion | FOLDER] [--system TEXT]   # multi-turn, streamed; --once "Q" for one answer
    tunepath params > params.yaml      # every knob with its default and a comment
    tunepath route --profile examples/profiles/sft_task.yaml [--json]   # explain a route for a profile

Every command works in the project folder (the one holding params.yaml), or the one given with --project.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunepath.offline import OFFLINE_ENV

SERVICES_ENV = Path(".tunepath") / "services.env"


def prepare_env(root: Path) -> None:
    """Environment for everything this process starts: offline, the project's own Prefect home, services if up."""
    env = dict(OFFLINE_ENV)
    env.update({
        "PREFECT_HOME": str(root / ".prefect"),
        # the temporary Prefect server takes 13-27 s to start here; the default 20 s limit fails now and then
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "tunepath",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        # The temporary server `tunepath run` starts has no browser client: no other site's page may call it
        # (Prefect's default is `*`; a JSON request from a page needs a preflight this refuses).
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": "http://127.0.0.1",
    })
    if (root / SERVICES_ENV).exists():
        from tunepath.services import live_env  # stdlib only: ignores the file when the servers are gone

        env.update(live_env(root))
    for key, value in env.items():
        os.environ.setdefault(key, value)


def tracking_uri(root: Path) -> str:
    from tunepath.stages import default_tracking_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def sqlite_file(uri: str) -> str | None:
    """The database file of a sqlite:/// tracking URI (what a locked or corrupt registry message names)."""
    return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None


def preflight(cfg, root: Path) -> None:
    """Catch the common mistakes before any server starts or model loads."""
    from tunepath.stages import Workspace, resolve_model

    raw = root / cfg.data.raw_dir
    if not raw.is_dir():
        raise FileNotFoundError(f"data.raw_dir: {raw} does not exist; put your data files there or run `tunepath demo`")
    if not any(p.is_file() and not p.name.startswith(".") and p.suffix != ".dvc" for p in raw.rglob("*")):
        raise FileNotFoundError(f"data.raw_dir: {raw} has no data files (.jsonl, .json, .parquet, .csv, .txt)")
    from tunepath.validate.readers import refuse_special_files

    refuse_special_files(raw)
    resolve_model(cfg.model, Workspace(root, ""))


RESUME = "run the same command again (finished stages are kept, training resumes from its last checkpoint)"


def cmd_run(args) -> int:
    import contextlib

    from tunepath.guard import guard_children
    from tunepath.interrupt import stop_on_signals
    from tunepath.runlock import ProjectBusy, project_lock

    with contextlib.ExitStack() as stack:
        stack.enter_context(stop_on_signals("tunepath run", tracking_uri(args.project), RESUME))
        stack.enter_context(guard_children())
        workspace = "isolated" if args.isolated else "in-place"
        if not (args.isolated or args.in_place or args.wait) and left_copy_to_resume(args):
            workspace = "isolated"  # the rerun of an interrupted isolated run goes on in its copy (the flow says so)
        if workspace != "isolated":
            # the lock before params.yaml is read and before the temporary Prefect server's 15-30 s start: a busy
            # project is known at once (refused with --in-place, queued with --wait, else this run goes isolated)
            try:
                stack.enter_context(project_lock(args.project, wait=args.wait))
            except ProjectBusy as busy:
                from tunepath.isolate import cannot_isolate

                reason = None if args.in_place else cannot_isolate(args.project)
                if args.in_place:
                    raise
                if reason:
                    raise ProjectBusy(f"{busy}; {reason}", holder_text=busy.holder_text) from None
                print(f"tunepath: {busy.holder_text}; this run works in a working copy of its own and lands as a DVC "
                      "experiment (--wait queues it instead)", file=sys.stderr, flush=True)
                workspace = "isolated"
        if workspace == "isolated":
            own_prefect_home()
        return _run(args, workspace)


def left_copy_to_resume(args) -> bool:
    """Whether an interrupted or failed isolated run with this run's params left a copy no run works in."""
    from tunepath import isolate, workspaces

    if not (args.project / isolate.WORKSPACES).is_dir() or isolate.cannot_isolate(args.project):
        return False
    cfg = load_run_config(args)
    return workspaces.resumable(args.project, workspaces.run_key(args.project, cfg.model_dump(mode="json"))) is not None


def load_run_config(args):
    from tunepath.params import load_config, load_recipe

    return load_recipe(args.config, args.set) if args.config else load_config(args.project / "params.yaml", args.set)


def own_prefect_home() -> None:
    """A temporary Prefect home for an isolated run without a Prefect server: two temporary servers on the
    project's one SQLite file would both migrate a new one and contend on every write. Its flow-run history
    goes with it; the results stay in MLflow and the DVC experiment (`tunepath up` keeps history for all)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import atexit
    import shutil
    import tempfile

    home = tempfile.mkdtemp(prefix="tunepath-prefect-")
    os.environ["PREFECT_HOME"] = home
    atexit.register(shutil.rmtree, home, True)  # registered before Prefect loads: runs after its server stops


def _run(args, workspace: str = "in-place") -> int:
    cfg = load_run_config(args)
    preflight(cfg, args.project)
    from flows.finetune import finetune

    result = finetune(config=cfg, project_dir=str(args.project), tracking_uri=tracking_uri(args.project), workspace=workspace)
    restored = f" (restored from DVC's run cache: {', '.join(result['restored'])})" if result.get("restored") else ""
    print(f"stages run: {', '.join(result['ran']) or 'none'}; up to date: {', '.join(result['skipped']) or 'none'}{restored}")
    if result.get("seconds"):
        print("stage seconds: " + ", ".join(f"{stage} {s}" for stage, s in result["seconds"].items()))
    record = result.get("registered")
    if result.get("experiment"):
        name = result["experiment"]["name"]
        print(f"results: DVC experiment {name} (`dvc exp show`; `dvc exp apply {name}` brings its params, dvc.lock and "
              "outputs into the project)")
    else:
        print(f"results: {args.project / 'artifacts'} (evaluate/metrics.json, merge/, register/model.json)")
    if record:
        tags = record.get("tags", {})
        print(f"registered: {record['name']} version {record['version']} @{record['alias']} "
              f"(git {tags.get('git_commit', '?')[:12]}, data {tags.get('data_hash', '?')[:12]}, "
              f"perplexity {tags.get('eval.perplexity', '?')})")
    where = result.get("mlflow_run_url") or f"{tracking_uri(args.project)}, open it with `make mlflow-ui`"
    if result.get("mlflow_run_reused"):
        print(f"MLflow run: none opened, nothing ran; the results are in run {result.get('mlflow_run_id')} ({where})")
    else:
        print(f"MLflow run: {result.get('mlflow_run_id')} ({where})")
    return 0


def cmd_stage(args) -> int:
    from tunepath.interrupt import stop_on_signals
    from tunepath.params import load_config
    from tunepath.runlock import project_lock
    from tunepath.stages import Workspace, run_stage

    from tunepath.registry import RUN_ENV

    # under `dvc repro` DVC releases its own lock while a stage's command runs; this one keeps a `tunepath run`
    # from rewriting params.yaml or artifacts/ meanwhile (and refuses this stage while such a run works)
    resume = f"`tunepath stage {args.name}` or `dvc repro` again"
    with stop_on_signals(f"tunepath stage {args.name}", tracking_uri(args.project), resume), project_lock(args.project):
        cfg = load_config(args.project / "params.yaml")
        # the run id: set by the flow for the processes it starts, or by a person who wants `dvc repro` in a run of their own
        run_stage(args.name, cfg, Workspace(args.project, tracking_uri(args.project), os.environ.get(RUN_ENV) or None))
    return 0


def cmd_workspaces(args) -> int:
    import time

    from tunepath import workspaces

    copies = workspaces.left_copies(args.project)
    if not copies:
        print("no working copies")
        return 0
    for c in copies:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["started"])) if c.get("started") else "?"
        why = f"; {c['error']}" if c.get("error") else ""
        print(f"{c['name']}  {c['state']}  {c['bytes'] / 1e6:.1f} MB  since {since}  pid {c.get('pid', '?')}  "
              f"`{c.get('command', '?')}`{why}")
    if args.clean:
        for c in (c for c in copies if c["state"] != "running"):
            removed = workspaces.remove_copy(args.project, c["name"])
            print(f"{'removed' if removed else 'kept (a run started in it)'}: {c['path']}")
    else:
        idle = [c for c in copies if c["state"] != "running"]
        if idle:
            print(f"{len(idle)} copies no run works in ({sum(c['bytes'] for c in idle) / 1e6:.1f} MB): the same command "
                  "resumes an interrupted one; `tunepath workspaces --clean` removes them")
    return 0


def cmd_demo(args) -> int:
    from tunepath.runlock import project_lock

    with project_lock(args.project):  # it rewrites the data a run reads and `dvc add`s it
        return _demo(args)


def _demo(args) -> int:
    from tunepath.demo import build_demo_model, generate_demo_data
    from tunepath.params import load_config

    cfg = load_config(args.project / "params.yaml")
    raw = args.project / cfg.data.raw_dir
    if args.force or not raw.is_dir() or not any(raw.iterdir()):
        counts = generate_demo_data(raw, cfg.demo)
        print(f"demo data: {raw} {counts}")
    track_data(args.project, cfg.data.raw_dir)
    model_dir = args.project / cfg.model.base
    if args.force or not (model_dir / "config.json").exists():
        files = sorted(p for p in raw.iterdir() if p.is_file() and not p.name.startswith("."))
        build_demo_model(model_dir, cfg.demo, files)
        print(f"demo model: {model_dir}")
    return 0


def track_data(root: Path, raw_dir: str) -> None:
    """`dvc add` the data folder (a no-op when unchanged) and push it to the project's DVC remote."""
    from dvc.repo import Repo

    from tunepath.logs import adopt_dvc_loggers

    adopt_dvc_loggers()
    target = f"{raw_dir}.dvc"
    with Repo(str(root)) as repo:
        if repo.status(targets=[target]) if (root / target).exists() else True:
            repo.add(raw_dir)
        # the data only: dvc.lock names pipeline outputs that a fresh clone has nowhere (its first run makes them)
        repo.push(targets=[target])


def cmd_up(args) -> int:
    from tunepath.services import ServiceOptions, start_services

    options = ServiceOptions(host=args.host, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, pool=args.pool,
                             allowed_hosts=tuple(args.allowed_host))
    report = start_services(args.project, options)
    for name, action in report.actions.items():
        print(f"{name}: {action}")
    print(f"deployments: {', '.join(report.deployments) or 'none'} (pool {args.pool}); concurrency limit gpu: {report.gpu_slots}")
    print(f"Prefect UI: {report.prefect_url}")
    print(f"MLflow UI:  {report.mlflow_url}")
    print(f"ready in {report.seconds:.0f} s; PIDs and logs in {args.project / '.tunepath'}; `tunepath run` and `dvc repro` now report here")
    return 0


def cmd_down(args) -> int:
    from tunepath.services import stop_services

    for name, what in stop_services(args.project).items():
        print(f"{name}: {what}")
    return 0


def cmd_status(args) -> int:
    from tunepath.services import service_status

    for name, s in service_status(args.project).items():
        state = ("running" + ("" if s.get("healthy", True) else ", not answering")) if s["running"] else "stopped"
        print(f"{name:8} {state:24} pid {s['pid'] or '-':<8} {s.get('url', '')}  log {s['log']}")
    return 0


def cmd_promote(args) -> int:
    from tunepath.params import load_config

    cfg = load_config(args.project / "params.yaml")
    name = args.model or cfg.register.model_name
    from flows.promote import promote

    record = promote(model_name=name, force=args.force, rollback=args.rollback, tracking_uri=tracking_uri(args.project),
                     config=cfg.promote, project_dir=str(args.project))
    print(f"{name}: {record['decision']}: {record['reason']}")
    print(f"models:/{name}@champion is version {record.get('champion_after') or 'none'}; @previous is {record.get('previous_after') or 'none'}")
    return 1 if record["decision"] == "rejected" else 0


def cmd_export(args) -> int:
    if "tqdm" not in sys.modules:
        # transformers' GGUF loader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors") while the
        # check reads the file back, past transformers' progress-bar switch; tqdm's TQDM_DISABLE, read when tqdm is
        # imported, turns it off for this command (export shows no bar of its own; the check says it runs)
        os.environ.setdefault("TQDM_DISABLE", "1")
    from tunepath.export import export
    from tunepath.export.gguf_file import ExportError

    try:
        model_dir = _model_folder(args.source, args.project)
        written = export(model_dir, args.out, tuple(args.format or ("gguf", "ollama", "vllm")), args.dtype, check=not args.no_check)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"tunepath export: {e}", file=sys.stderr)
        return 1
    for kind, what in written.items():
        where = what["path"] if isinstance(what, dict) else what
        extra = f" (read back: logit gap {what['check']['logit_gap']})" if isinstance(what, dict) and "check" in what else ""
        print(f"{kind}: {where}{extra}")
    return 0


def _model_folder(source: str, project: Path) -> Path:
    """A model folder from a path or a registry reference (models:/NAME@ALIAS or models:/NAME/VERSION)."""
    if not source.startswith("models:/"):
        path = Path(source)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a model folder (no config.json); run the pipeline up to merge, or pass models:/NAME@ALIAS")
        return path
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(project))
    local = Path(mlflow.artifacts.download_artifacts(source))
    found = sorted(p.parent for p in local.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    if not found:
        raise FileNotFoundError(f"{source}: the registered artifact holds no model folder with safetensors")
    return found[0]


def cmd_chat(args) -> int:
    """A conversation with a model folder or a registered model, prompted as in training; one answer with --once."""
    from tunepath.serve.terminal import Conversation, Loading, converse, load_chat, resolve_model

    question = args.once if args.once is not None else args.message
    if args.once is not None and args.message is not None:
        raise ValueError("tunepath chat: give the question either as an argument or with --once, not both")
    if os.environ.get("TUNEPATH_DEBUG"):
        import logging

        logging.getLogger("tunepath.serve").setLevel(logging.DEBUG)  # which path answers, and why
    uri = tracking_uri(args.project) if args.model.startswith("models:/") else None
    source = resolve_model(args.model, uri)
    if question is None:  # the model loads while the first question is typed
        conversation = Conversation(Loading(source, args.temperature), args.system, args.max_tokens, args.temperature)
        return converse(conversation, sys.stdin, sys.stdout, sys.stderr, args.show_prompt_ids)
    conversation = Conversation(load_chat(source, args.temperature), args.system, args.max_tokens, args.temperature)
    ids = conversation.prompt_ids(question)
    if args.show_prompt_ids:
        print(f"prompt ids: {ids}", file=sys.stderr)
    conversation.ask(question, sys.stdout, ids=ids)
    return 0


def cmd_params(args) -> int:
    from tunepath.params import render_defaults

    sys.stdout.write(render_defaults())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepath", description="Validate, tokenize, route, train, evaluate, merge and register an LLM fine-tune.")
    parser.add_argument("--project", type=Path, default=Path("."), help="project folder holding params.yaml (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the finetune flow end to end")
    run.add_argument("--config", type=Path, metavar="RECIPE.yaml", help="a recipe (examples/recipes/): a partial config over the defaults, instead of params.yaml's values")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a params.yaml value (repeatable); written back to params.yaml (a working copy's, for an isolated run)")
    busy = run.add_mutually_exclusive_group()
    busy.add_argument("--wait", action="store_true", help="when another run works in this project folder, wait for it, then run here")
    busy.add_argument("--in-place", action="store_true", help="run in this project folder or not at all: stop when another run works here")
    busy.add_argument("--isolated", action="store_true", help="run in a working copy of its own even when the project is free "
                      "(the default when another run works here): the result is a DVC experiment and a registry version")
    run.set_defaults(func=cmd_run)
    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=["validate", "tokenize", "route", "train", "evaluate", "merge", "register"])
    stage.set_defaults(func=cmd_stage)
    demo = sub.add_parser("demo", help="build the demo model and data when missing")
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.set_defaults(func=cmd_demo)
    up = sub.add_parser("up", help="start Prefect and MLflow servers, a worker and the deployments (loopback)")
    up.add_argument("--host", default="127.0.0.1", help="address the servers bind (default 127.0.0.1; anything else has no auth: see infra/)")
    up.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port; 0 or busy: a free one (default 4200)")
    up.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port; 0 or busy: a free one (default 5000)")
    up.add_argument("--pool", default="tunepath", help="process work pool the worker serves (default tunepath)")
    up.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                    help="another name the servers answer to (repeatable); others, and other sites' pages, get 403")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop exactly the processes `tunepath up` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="the services `tunepath up` started: PID, URL, health, log").set_defaults(func=cmd_status)
    spaces = sub.add_parser("workspaces", help="the working copies of isolated runs: running, interrupted (the same command resumes there), failed")
    spaces.add_argument("--clean", action="store_true", help="remove every copy no run works in (an interrupted run then starts afresh)")
    spaces.set_defaults(func=cmd_workspaces)
    promote = sub.add_parser("promote", help="move the registry alias `champion` to the candidate when it is better, or roll back")
    promote.add_argument("--model", default=None, help="registered model name (default: register.model_name in params.yaml)")
    action = promote.add_mutually_exclusive_group()
    action.add_argument("--force", action="store_true", help="promote the candidate without comparing (recorded on the version)")
    action.add_argument("--rollback", action="store_true", help="point `champion` back at the `previous` version")
    promote.set_defaults(func=cmd_promote)
    export = sub.add_parser("export", help="the merged model as GGUF (llama.cpp), an Ollama Modelfile and a vLLM folder")
    export.add_argument("source", nargs="?", default="artifacts/merge/model", help="model folder or models:/NAME@ALIAS (default artifacts/merge/model)")
    export.add_argument("--format", action="append", choices=["gguf", "ollama", "vllm"], help="repeatable (default: all three)")
    export.add_argument("--dtype", default="f16", choices=["f16", "bf16", "f32", "q8_0"], help="GGUF tensor type (default f16)")
    export.add_argument("--out", type=Path, default=Path("artifacts/export"), help="output folder (default artifacts/export)")
    export.add_argument("--no-check", action="store_true", help="skip reading the GGUF back and comparing logits")
    export.set_defaults(func=cmd_export)
    chat = sub.add_parser("chat", help="talk to a tuned model in the terminal (multi-turn, streamed), prompted as in training",
                          description="Multi-turn chat on stdin/stdout: /reset forgets the conversation, /exit or Ctrl-D ends it. "
                          "With a question (argument or --once) it prints one answer and exits.")
    chat.add_argument("message", nargs="?", default=None, help="one question: print its answer and exit (as --once)")
    chat.add_argument("--once", metavar="QUESTION", default=None, help="one question: print its answer and exit (for scripts)")
    chat.add_argument("--model", default="models:/tunepath-demo@champion",
                      help="model folder (e.g. artifacts/merge/model) or registry reference (default models:/tunepath-demo@champion)")
    chat.add_argument("--system", default=None, help="a system message that starts the conversation (kept by /reset)")
    chat.add_argument("--max-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    chat.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 answers greedily (default 0)")
    chat.add_argument("--show-prompt-ids", action="store_true", help="also print each prompt's token ids (stderr)")
    chat.set_defaults(func=cmd_chat)
    params = sub.add_parser("params", help="print params.yaml with every default and what it does")
    params.set_defaults(func=cmd_params)
    sub.add_parser("route", help="explain the training route for a profile file (tunepath route --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["route"]:
        # argparse cannot hand options like --profile through to a sub-parser's REMAINDER; route has its own parser
        from tunepath.route.cli import route_main

        return route_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.project = args.project.resolve()
    prepare_env(args.project)
    from tunepath import logs

    logs.setup(debug=bool(os.environ.get("TUNEPATH_DEBUG")))
    from tunepath.errors import USER_ERRORS, describe, explain_fault

    try:
        return args.func(args)
    except Exception as e:
        if os.environ.get("TUNEPATH_DEBUG"):
            raise  # the whole traceback, for whoever debugs tunepath itself
        fault = explain_fault(e, mlflow_db=sqlite_file(tracking_uri(args.project)), root=args.project)
        if fault is None and not isinstance(e, USER_ERRORS):
            raise  # a bug: its traceback is what fixes it
        print(f"tunepath: error: {fault or describe(e)} (TUNEPATH_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunepath: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
