"""`tunepath chat`: a conversation with a tuned model in the terminal, prompted as in training, answers streamed.

    tunepath chat --model artifacts/merge/model                  # multi-turn; /reset forgets, /exit (or Ctrl-D) ends
    tunepath chat --model models:/tunepath-demo@champion --system "Be brief."
    tunepath chat --once "Where is my order?"                    # one answer, for scripts

A model folder loads with transformers alone; MLflow is imported only to fetch a `models:/` reference, whose
logged settings (template arguments, the pinned date) are the ones the registered model serves with.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

COMMANDS = {"/reset": "forget the conversation (the system message stays)", "/exit": "end the chat (also /quit, Ctrl-D)"}


@dataclass
class ChatSource:
    """A model folder to chat with and the settings it was registered with (empty for a plain folder)."""

    folder: Path
    settings: dict = field(default_factory=dict)


def resolve_model(source: str, tracking_uri: str | None = None) -> ChatSource:
    """A model folder, or a registry reference (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) fetched into MLflow's cache."""
    if not source.startswith("models:/"):
        folder = Path(source)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"--model {source}: not a model folder (no config.json); pass the merged model "
                                    "(artifacts/merge/model) or a registry reference like models:/tunepath-demo@champion")
        return ChatSource(folder)
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(source))
    except MlflowException as e:
        raise ValueError(f"--model {source}: {e.message}") from e
    settings = {}
    if (local / "MLmodel").exists():
        from mlflow.models import Model

        settings = dict(Model.load(str(local)).flavors.get("python_function", {}).get("model_config") or {})
    found = sorted(p.parent for p in local.rglob("config.json") if any(p.parent.glob("*.safetensors")))
    if not found:
        raise ValueError(f"--model {source}: the registered artifact holds no model folder with safetensors")
    return ChatSource(found[0], settings)


def load_chat(source: ChatSource):
    _import_transformers_lean()
    from transformers.utils import logging as hf_logging

    from tunepath.serve.chat import ChatModel

    hf_logging.disable_progress_bar()  # "Loading weights" would print between the user's line and the answer

    s = source.settings
    return ChatModel(source.folder, name=s.get("name", ""), template_kwargs=s.get("template_kwargs") or {},
                     render_date=s.get("render_date"))


def _import_transformers_lean() -> None:
    """Import transformers' model and generation code with scikit-learn and SciPy hidden. When installed,
    transformers imports them only for assisted generation's confidence threshold and object-detection losses,
    which chat never uses; on a 2-core machine they were 4-8 s of the start. Hidden during this import only:
    both import normally afterwards (transformers alone keeps treating them as absent in this process)."""
    import sys

    hidden = [name for name in ("sklearn", "scipy") if name not in sys.modules]
    if "transformers.modeling_utils" in sys.modules or not hidden:
        return
    for name in hidden:
        sys.modules[name] = None  # importlib.util.find_spec answers None, so transformers' availability checks say no
    try:
        import transformers.generation.candidate_generator  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


class Conversation:
    """The turns so far; each answer is generated from the whole history, encoded as in training."""

    def __init__(self, chat, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0) -> None:
        self.chat, self.system = chat, system
        self.request = {"max_tokens": max_tokens, "temperature": temperature}
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, question: str) -> list[int]:
        return self.chat.prompts.encode([*self.messages, {"role": "user", "content": question}])

    def ask(self, question: str, out: TextIO, stop: threading.Event | None = None, ids: list[int] | None = None) -> str:
        """Print the answer to `question` to `out` while it is generated; the finished turn joins the history."""
        ids = self.prompt_ids(question) if ids is None else ids
        pieces, pending = [], ""
        for piece in self.chat.stream(ids, self.request, stop):
            # whitespace around the answer is held back, as `complete` strips it; inside it, it is printed
            text = pending + piece if pieces else (pending + piece).lstrip()
            shown = text.rstrip()
            pending = text[len(shown):]
            if shown:
                pieces.append(shown)
                out.write(shown)
                out.flush()
        out.write("\n")
        out.flush()
        answer = "".join(pieces)
        if not (stop and stop.is_set()):  # a cut-off answer is not what the model would say next time
            self.messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return answer


def converse(conversation: Conversation, stdin: TextIO, out: TextIO, err: TextIO, show_prompt_ids: bool = False) -> int:
    """Read questions line by line until /exit or end of input; answer each with the conversation so far."""
    interactive = stdin.isatty()
    if interactive:
        err.write("Type a message; " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()) + "\n")
    while True:
        try:
            line = input("> ") if interactive and stdin is sys.stdin else stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:
            err.write("\n")
            return 0
        if not line:  # end of input (Ctrl-D or a closed pipe)
            return 0
        text = line.rstrip("\r\n")
        command = text.strip().lower()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            conversation.reset()
            err.write("(conversation reset)\n")
            err.flush()
            continue
        if command.startswith("/") and " " not in command:
            err.write(f"unknown command {command}; commands: {', '.join(COMMANDS)} (start the line with a space to send it as text)\n")
            err.flush()
            continue
        ids = conversation.prompt_ids(text)
        if show_prompt_ids:
            err.write(f"prompt ids: {ids}\n")
            err.flush()
        stop = threading.Event()
        try:
            conversation.ask(text, out, stop, ids)
        except KeyboardInterrupt:
            stop.set()  # ends generation after the current token; the turn is dropped
            out.write("\n")
            err.write("(answer stopped; not kept in the conversation)\n")
        if interactive:
            out.write("\n")
