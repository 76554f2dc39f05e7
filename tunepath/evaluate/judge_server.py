"""A minimal OpenAI-compatible chat server for a local model folder, on loopback: `POST /v1/chat/completions` and
`GET /v1/models`, greedy generation with the folder's chat template. It lets the judge path run with no service
outside this machine (on the demo model it exercises the client and the HTTP protocol, not judgement); point
`evaluate.judge.base_url` at a real server (vLLM, llama.cpp, a hosted API) for verdicts worth having.

    python -m tunepath.evaluate.judge_server models/demo --port 8011   # base_url http://127.0.0.1:8011/v1
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ChatModel:
    """A model folder that answers chat messages; one generation at a time."""

    def __init__(self, folder: Path, name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        self.lock = threading.Lock()
        self.requests = 0

    def complete(self, messages: list[dict], max_tokens: int) -> tuple[str, int, int, str]:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        eos = self.model.generation_config.eos_token_id
        with self.lock, torch.no_grad():
            self.requests += 1
            out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        stops = eos if isinstance(eos, list) else [eos]
        finish = "stop" if new and new[-1] in stops else "length"
        return self.tokenizer.decode(new, skip_special_tokens=True).strip(), len(ids), len(new), finish


def make_handler(chat: ChatModel):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the test tier and the stage log their own lines
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "owned_by": "tunepath"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                messages = request["messages"]
                max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 64)
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
                return
            text, prompt_tokens, completion_tokens, finish = chat.complete(messages, max_tokens)
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", chat.name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })

    return Handler


def start(folder: Path, host: str = "127.0.0.1", port: int = 0, name: str = "judge") -> tuple[ThreadingHTTPServer, ChatModel]:
    """Serve in a background thread; returns the server (its address: server.server_address) and the model."""
    chat = ChatModel(Path(folder), name)
    server = ThreadingHTTPServer((host, port), make_handler(chat))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model folder (with its tokenizer and chat template)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--name", default="judge", help="model name reported by /v1/models")
    args = parser.parse_args()
    server, _ = start(args.model, args.host, args.port, args.name)
    print(f"serving {args.model} at http://{server.server_address[0]}:{server.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
