"""A minimal OpenAI-compatible chat server for a local model folder, on loopback: `POST /v1/chat/completions` and
`GET /v1/models`, greedy generation with the folder's chat template
(prompts encoded as in training: `tunepath.serve`). It lets the judge path run with no service
outside this machine (on the demo model it exercises the client and the HTTP protocol, not judgement); point
`evaluate.judge.base_url` at a real server (vLLM, llama.cpp, a hosted API) for verdicts worth having.

    python -m tunepath.evaluate.judge_server models/demo --port 8011   # base_url http://127.0.0.1:8011/v1
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tunepath.serve.chat import ChatModel


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
                answer = chat.complete({"max_tokens": 64, **request})
            except (ValueError, KeyError, TypeError) as e:  # PromptError is a ValueError
                self._send(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
                return
            self._send(200, {**answer, "model": request.get("model", chat.name)})

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
