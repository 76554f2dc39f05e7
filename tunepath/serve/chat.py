"""A model folder (the merged model: weights, tokenizer, training chat template, generation config) that answers
OpenAI-style chat requests, its prompts encoded by `PromptEncoder`.

    from tunepath.serve.chat import ChatModel
    chat = ChatModel(Path("artifacts/merge/model"))
    chat.complete({"messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 64})

The answer is a chat completion (`choices[0].message.content`, `finish_reason`, `usage`); a request with
`custom_inputs: {"return_prompt_ids": true}` also gets the prompt's ids in `custom_outputs`, so a client can see
exactly which control tokens reached the model. `stream` yields the same answer's text while it is generated
(what `tunepath chat` prints).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tunepath.serve.prompt import PromptEncoder, PromptError

OPTIONS = ("model", "user", "seed", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "n", "stream", "tools", "custom_inputs")


class ChatModel:
    """One model folder; one generation at a time (a served model shares its weights across requests)."""

    def __init__(self, folder: Path, name: str = "", template_kwargs: dict | None = None, render_date: str | None = None,
                 max_new_tokens: int = 256, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or Path(folder).name
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(str(folder)).to(self.device).eval()
        date = dt.date.fromisoformat(render_date) if render_date else None
        self.prompts = PromptEncoder(self.tokenizer, self.tokenizer.chat_template, template_kwargs, date)
        eos = self.model.generation_config.eos_token_id
        stops = eos if isinstance(eos, list) else [eos]
        self.stop_ids = [i for i in dict.fromkeys([*stops, self.tokenizer.eos_token_id]) if i is not None]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.requests = 0  # answered so far

    def complete(self, request: dict) -> dict:
        """A chat completion for one request ({"messages": [...], "max_tokens": ..., "temperature": ...})."""
        if not isinstance(request, dict) or "messages" not in request:
            raise PromptError("a chat request is an object with `messages`")
        unknown = sorted(set(request) - {"messages", *OPTIONS})
        if unknown:
            raise PromptError(f"unknown request field(s): {', '.join(unknown)}")
        if request.get("stream") or (request.get("n") or 1) != 1:
            raise PromptError("only n=1 without streaming is served")
        ids = self.prompts.encode(request["messages"], request.get("tools"))
        new, finish = self.generate(ids, request)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for stop in _stops(request.get("stop")):
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()), "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)},
        }
        if (request.get("custom_inputs") or {}).get("return_prompt_ids"):
            answer["custom_outputs"] = {"prompt_ids": ids}
        return answer

    def stream(self, ids: list[int], request: dict, stop=None) -> Iterator[str]:
        """The answer to prompt `ids` as text pieces while it is generated (greedy unless `temperature`); setting
        the `threading.Event` `stop` ends it after the next token."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(ids, request, streamer=streamer, stop=stop)
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread below)
                failure.append(e)
                streamer.end()  # the reader would otherwise wait for text forever

        worker = threading.Thread(target=run, name="tunepath-generate", daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def generate(self, ids: list[int], request: dict, streamer=None, stop=None) -> tuple[list[int], str]:
        import torch

        limit = int(request.get("max_tokens") or request.get("max_completion_tokens") or self.max_new_tokens)
        if limit < 1:
            raise PromptError(f"max_tokens {limit} must be at least 1")
        temperature = float(request.get("temperature") or 0)
        sampling = {"do_sample": False} if temperature <= 0 else {
            "do_sample": True, "temperature": temperature,
            **({"top_p": float(request["top_p"])} if request.get("top_p") else {}),
            **({"top_k": int(request["top_k"])} if request.get("top_k") else {}),
        }
        with self.lock, torch.no_grad():
            self.requests += 1
            out = self.model.generate(input_ids=torch.tensor([ids], device=self.device),
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                                      max_new_tokens=limit, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                      streamer=streamer, stopping_criteria=_stopped_by(stop), **sampling)
        new = out[0, len(ids):].tolist()
        end = next((k for k, t in enumerate(new) if t in self.stop_ids), None)
        return (new[: end + 1], "stop") if end is not None else (new, "length")


def _stops(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [s for s in value if s]


def _stopped_by(event):
    """A stopping criterion that ends generation once `event` (a threading.Event) is set; none without one."""
    if event is None:
        return None
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Stopped()])
