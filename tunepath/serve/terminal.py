"""`tunepath chat`: a conversation with a tuned model in the terminal, prompted as in training, answers streamed.

    tunepath chat --model artifacts/merge/model                  # multi-turn; /reset forgets, /exit (or Ctrl-D) ends
    tunepath chat --model models:/tunepath-demo@champion --system "Be brief."
    tunepath chat --once "Where is my order?"                    # one answer, for scripts

A model folder loads with transformers alone; MLflow is imported only to fetch a `models:/` reference, whose
logged settings (template arguments, the pinned date) are the ones the registered model serves with.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)
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


def load_chat(source: ChatSource, temperature: float = 0.0):
    """The model to chat with: the fast path (`lite`: torch and tokenizers, no transformers) when it answers
    this folder as transformers would, else `ChatModel`. TUNEPATH_DEBUG=1 says which, and why."""
    from tunepath.serve import lite

    s = source.settings
    options = {"name": s.get("name", ""), "template_kwargs": s.get("template_kwargs") or {}, "render_date": s.get("render_date")}
    reason = lite.unsupported(source.folder, temperature)
    if reason is None:
        _use_idle_cores()
        try:
            chat = lite.LiteChat(source.folder, **options)
        except (KeyError, ValueError) as e:  # weights named or shaped otherwise than the config says
            reason = f"the weights do not fit the fast path ({e})"
        else:
            log.debug("chat: fast path (torch and tokenizers, without transformers) for %s", source.folder)
            return chat
    log.debug("chat: transformers path for %s: %s", source.folder, reason)
    _import_transformers_lean()
    from transformers.utils import logging as hf_logging

    from tunepath.serve.chat import ChatModel

    hf_logging.disable_progress_bar()  # "Loading weights" would print between the user's line and the answer
    _use_idle_cores()
    return ChatModel(source.folder, **options)


class Loading:
    """`load_chat` in a thread, started at once: torch, transformers and the weights load while the first question
    is typed (the imports are most of the wait). `get` waits for the model and raises what loading raised."""

    def __init__(self, source: ChatSource, temperature: float = 0.0) -> None:
        self._model, self._failure = None, None
        self._thread = threading.Thread(target=self._load, args=(source, temperature), name="tunepath-chat-load", daemon=True)
        self._thread.start()

    def _load(self, source: ChatSource, temperature: float) -> None:
        try:
            self._model = load_chat(source, temperature)
        except BaseException as e:  # noqa: BLE001  (re-raised in the asking thread by get)
            self._failure = e

    @property
    def ready(self) -> bool:
        return not self._thread.is_alive()

    def get(self):
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._model


# Hidden from transformers' first import: optional packages that only its unused features would need. scikit-learn
# and SciPy: assisted generation's confidence threshold and object-detection losses; trio: httpcore's async
# backend (the hub client's); click: httpx's command line, which also pulls rich and pygments; PIL: images in
# chat templates. On a 2-core machine they were 4-8 s of the start (sklearn, SciPy) and about 0.3 s (the rest).
LEAN_HIDDEN = ("sklearn", "scipy", "trio", "click", "PIL")


def _import_transformers_lean() -> None:
    """Import transformers' model and generation code with `LEAN_HIDDEN` hidden. Hidden during this import only:
    each imports normally afterwards (transformers alone keeps treating them as absent in this process)."""
    import sys

    hidden = [name for name in LEAN_HIDDEN if name not in sys.modules]
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


def _use_idle_cores() -> None:
    """Generate with as many threads as there are idle cores (at least one). torch takes every core; when other
    processes hold them, its threads wait on each other: the demo model answered 10x slower with 2 threads than
    with 1 on a 2-core machine at load 6 (0.5 B models gain from threads only on cores that are free)."""
    import os

    import torch

    if torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cores - int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    torch.set_num_threads(max(1, min(torch.get_num_threads(), idle)))


class Conversation:
    """The turns so far; each answer is generated from the whole history, encoded as in training."""

    def __init__(self, chat, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0) -> None:
        """`chat` is a ChatModel, or a `Loading` whose model is waited for when the first question is asked."""
        self._chat, self.system = chat, system
        self.request = {"max_tokens": max_tokens, "temperature": temperature}
        self.messages: list[dict] = []
        self.reset()

    @property
    def loading(self) -> bool:
        """True while the model is still loading in the background."""
        return isinstance(self._chat, Loading) and not self._chat.ready

    @property
    def chat(self):
        if isinstance(self._chat, Loading):
            self._chat = self._chat.get()
        return self._chat

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
        if interactive and conversation.loading:
            err.write("(still loading the model; the answer follows)\n")
            err.flush()
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
