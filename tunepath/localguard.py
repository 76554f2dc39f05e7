"""Local servers answer local callers only: an ASGI guard that refuses foreign Host headers and foreign Origins.

A server on 127.0.0.1 is reachable from every web page the user opens: the page cannot read a cross-origin
answer, but a form POST or `fetch(..., {mode: "no-cors"})` still reaches the server and acts (Prefect answers
every Origin with `Access-Control-Allow-Origin: *`, so it could even read), and DNS rebinding makes a foreign
name resolve to 127.0.0.1 so that the page counts as same-origin. Browsers always send the page's Origin on
state-changing and cross-origin requests and the name they resolved as Host, so a server that accepts only its
own loopback names as Host, and only its own address as Origin, cannot be driven by a page. Clients outside a
browser (the worker, the CLI, MLflow's client) send no Origin and a loopback Host, and pass.

    app = LocalOnly(app, local_hosts("127.0.0.1", 4200))   # origins: http://<each host>
"""

from __future__ import annotations

import socket

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def local_hosts(bind: str, port: int, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The Host values the server answers to: its loopback names with the port; for a non-loopback bind also the
    bound address and this machine's names; and `extra` (host or host:port, as the caller names the server)."""
    names = list(LOOPBACK)
    if bind not in ("127.0.0.1", "localhost", "::1", ""):
        if bind not in ("0.0.0.0", "::"):
            names.append(f"[{bind}]" if ":" in bind else bind)
        names += [socket.gethostname(), socket.getfqdn()]
    hosts = [f"{n}:{port}" for n in dict.fromkeys(names) if n]
    return list(dict.fromkeys([*hosts, *(h.strip() for h in extra if h.strip())]))


def origins_of(hosts: list[str]) -> list[str]:
    return [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]


class LocalOnly:
    """ASGI middleware: 403 for an HTTP request (a refused WebSocket handshake) whose Host is not one of `hosts`
    or whose Origin, when sent, is not one of `origins` (default: http(s)://<host> for each host)."""

    def __init__(self, app, hosts: list[str], origins: list[str] | None = None) -> None:
        self.app = app
        self.hosts = {h.lower() for h in hosts}
        self.origins = {o.lower() for o in (origins if origins is not None else origins_of(hosts))}

    def refusal(self, headers) -> str | None:
        """Why a request with these (name, value) byte headers is refused; None when it is let through."""
        hosts = [v.decode("latin-1").strip().lower() for k, v in headers if k.lower() == b"host"]
        if len(hosts) != 1 or hosts[0] not in self.hosts:
            return f"Host {hosts[0] if hosts else '(none)'!r} is not this local server's address; open it as http://{sorted(self.hosts)[0]}"
        for k, v in headers:
            if k.lower() == b"origin":
                origin = v.decode("latin-1").strip().lower()
                if origin not in self.origins:
                    return f"cross-origin request from {origin!r} refused: this server answers only its own pages and local clients"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            why = self.refusal(scope.get("headers") or [])
            if why is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
                    return
                body = (why + "\n").encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
