"""`tunepath chat` as a person uses it: a real process reading questions from stdin, answering from the whole
conversation, streaming each answer, /reset and /exit; the one-shot form for scripts; a model folder needs
neither Prefect nor MLflow. (The registry path, `models:/...`, is checked in test_serve.py with a logged model.)
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 24


def chat_process(folder: Path, *args: str, stdin=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tunepath.cli", "--project", str(folder.parent), "chat", "--model", str(folder),
                             "--max-tokens", str(MAX_TOKENS), *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=folder.parent)


@pytest.fixture(scope="module")
def model(demo_assets):
    from tunepath.serve.chat import ChatModel

    folder = demo_assets / "models" / "demo"
    return folder, ChatModel(folder)


def reference_answer(chat, messages: list[dict]) -> str:
    return chat.complete({"messages": messages, "max_tokens": MAX_TOKENS})["choices"][0]["message"]["content"]


def prompt_ids(stderr: str) -> list[list[int]]:
    return [json.loads(line.split("prompt ids: ", 1)[1]) for line in stderr.splitlines() if line.startswith("prompt ids: ")]


def test_each_answer_sees_the_conversation_so_far_and_reset_forgets_it(model):
    folder, chat = model
    system, q1, q2, q3 = "You are Northwind's support.", "Where is my order NW-1001?", "Can I return it?", "Hi"
    proc = chat_process(folder, "--system", system, "--show-prompt-ids")
    out, err = proc.communicate(f"{q1}\n{q2}\n/reset\n{q3}\n/exit\nnever asked\n".encode(), timeout=300)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, err

    sys_msg, a1 = {"role": "system", "content": system}, reference_answer(chat, [{"role": "system", "content": system}, {"role": "user", "content": q1}])
    first = [sys_msg, {"role": "user", "content": q1}]
    second = [*first, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    after_reset = [sys_msg, {"role": "user", "content": q3}]
    asked = prompt_ids(err)
    assert len(asked) == 3, err  # /exit ends the chat: the line after it is never asked
    assert asked[0] == chat.prompts.encode(first)
    assert asked[1] == chat.prompts.encode(second)  # the second prompt holds the first turn, answer included
    assert asked[2] == chat.prompts.encode(after_reset)  # /reset forgot both turns and kept the system message
    assert "(conversation reset)" in err
    # the streamed answers are the non-streamed ones, in order, each on its own line(s)
    a2 = reference_answer(chat, second)
    a3 = reference_answer(chat, after_reset)
    assert out == f"{a1}\n{a2}\n{a3}\n"
    assert a1  # the demo model answers the demo's questions


def test_end_of_input_ends_the_chat_and_unknown_commands_are_explained(model):
    folder, chat = model
    proc = chat_process(folder)
    out, err = proc.communicate(b"/help-me\nHi\n", timeout=300)  # no /exit: end of input ends it
    assert proc.returncode == 0, err.decode()
    assert "unknown command /help-me; commands: /reset, /exit" in err.decode()
    assert out.decode() == reference_answer(chat, [{"role": "user", "content": "Hi"}]) + "\n"


def test_the_answer_is_streamed_before_the_process_ends(model):
    folder, chat = model
    question = "Where is my order NW-1001?"
    answer = reference_answer(chat, [{"role": "user", "content": question}])
    proc = chat_process(folder)
    try:
        proc.stdin.write(f"{question}\n".encode())
        proc.stdin.flush()  # stdin stays open: the process waits for the next question after answering
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready, "no answer within 300 s"
        chunk = os.read(proc.stdout.fileno(), 65536).decode()
        assert proc.poll() is None  # the answer arrived while the chat goes on
        assert chunk and answer.startswith(chunk.rstrip("\n"))
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert chunk + rest.decode() == answer + "\n"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mapped libraries from /proc")
def test_the_model_loads_while_the_first_question_is_still_being_typed(model):
    """Interactive: torch and the weights load before any line arrives, so a person typing waits less."""
    folder, chat = model
    proc = chat_process(folder)
    try:
        deadline, loaded = time.monotonic() + 300, False
        while not loaded and time.monotonic() < deadline and proc.poll() is None:
            maps = Path(f"/proc/{proc.pid}/maps").read_text(errors="replace")
            loaded = "libtorch_cpu" in maps and "model.safetensors" in maps  # torch imported, the weights mapped
            time.sleep(0.2)
        assert loaded, "nothing loaded while waiting for the first question"
        out, err = proc.communicate(b"Hi\n", timeout=300)  # the question only now
        assert proc.returncode == 0, err.decode()
        assert out.decode() == reference_answer(chat, [{"role": "user", "content": "Hi"}]) + "\n"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tokens_are_yielded_while_generation_runs(model):
    """In-process: the first piece arrives while the generating thread still holds the model, and more follow."""
    _, chat = model
    ids = chat.prompts.encode([{"role": "user", "content": "Where is my order NW-1001?"}])
    pieces, generating_at_first = [], None
    for piece in chat.stream(ids, {"max_tokens": 64}):
        if generating_at_first is None:
            generating_at_first = chat.lock.locked()
        pieces.append(piece)
    assert generating_at_first, "the first piece came after generation had finished"
    assert len(pieces) > 3
    full = chat.complete({"messages": [{"role": "user", "content": "Where is my order NW-1001?"}], "max_tokens": 64})
    assert "".join(pieces).strip() == full["choices"][0]["message"]["content"]


def test_once_answers_one_question_without_prefect_or_mlflow(model):
    folder, chat = model
    code = ("import sys; from tunepath.cli import main; "
            f"rc = main(['--project', {str(folder.parent)!r}, 'chat', '--model', {str(folder)!r}, '--once', 'Hi', '--max-tokens', '{MAX_TOKENS}']); "
            "heavy = sorted(m for m in ('prefect', 'mlflow', 'dvc') if m in sys.modules); "
            "print('loaded:', heavy, file=sys.stderr); raise SystemExit(rc)")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stderr
    assert done.stdout == reference_answer(chat, [{"role": "user", "content": "Hi"}]) + "\n"
    print(f"tunepath chat --once: {time.monotonic() - started:.1f} s from start to exit")


def test_once_and_a_question_argument_together_is_a_one_line_error(model, capsys):
    from tunepath.cli import main

    folder, _ = model
    assert main(["--project", str(folder.parent), "chat", "Hi", "--once", "Hello", "--model", str(folder)]) == 2
    assert "either as an argument or with --once, not both" in capsys.readouterr().err


def test_a_folder_that_is_not_a_model_is_named(tmp_path, capsys):
    from tunepath.cli import main

    assert main(["--project", str(tmp_path), "chat", "--once", "Hi", "--model", str(tmp_path)]) == 2
    assert f"--model {tmp_path}: not a model folder (no config.json)" in capsys.readouterr().err


def test_chat_help_imports_no_heavy_library():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "tunepath.cli", "chat", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "--once" in out.stdout and "/reset" in out.stdout
    heavy = [m for m in ("torch", "transformers", "prefect", "mlflow", "sklearn") if f"| {m}\n" in out.stderr]
    assert heavy == [], f"chat --help imported {heavy}"
