"""``python -m afina.gateway [--host H] [--port P]``: serve the gateway with settings from the environment."""

from __future__ import annotations

import argparse

import uvicorn

from afina.gateway.app import create_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m afina.gateway", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None, proxy_headers=False)


if __name__ == "__main__":
    main()
