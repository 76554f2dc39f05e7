"""The Prefect server `tunepath up` starts: Prefect's own app (API and UI, as `prefect server start` serves it
with one worker process), behind `tunepath.localguard.LocalOnly`, so a web page open in the user's browser
cannot create or change runs.

    python -m flows.server --host 127.0.0.1 --port 4200

Prefect 3.9 has CORS settings (`PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS`, set here to the server's own
origins) but no Host check, and CORS alone does not stop a request: it only hides the answer from the page.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--allowed-host", action="append", default=[], metavar="HOST[:PORT]",
                        help="another name the server answers to, besides its loopback names (repeatable)")
    args = parser.parse_args(argv)

    import os

    from tunepath.localguard import LocalOnly, local_hosts, origins_of

    hosts = local_hosts(args.host, args.port, args.allowed_host)
    os.environ["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] = ",".join(origins_of(hosts))  # read when the app is made

    import uvicorn

    import prefect
    from prefect.server.api.server import create_app
    from prefect.settings import (PREFECT_SERVER_API_KEEPALIVE_TIMEOUT, PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
                                  PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT, PREFECT_SERVER_LOGGING_LEVEL)

    print(f"Prefect server at http://{hosts[0]} (answers Host {', '.join(hosts)} and no other origin)", flush=True)
    uvicorn.run(
        app=LocalOnly(create_app(final=True), hosts),
        app_dir=str(prefect.__module_path__.parent),
        host=args.host, port=args.port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
