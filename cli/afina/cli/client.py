"""How the CLI finds a running stack: flags, then ``AFINA_BASE_URL``/``AFINA_API_KEY``, then ``afina up``'s state."""

from __future__ import annotations

import os
from pathlib import Path

from afina.deploy.runner import load_state


def default_home() -> Path:
    return Path(os.environ.get("AFINA_HOME", Path.home() / ".afina"))


def connection(home: Path, base_url: str | None = None, api_key: str | None = None) -> tuple[str, str]:
    base_url = base_url or os.environ.get("AFINA_BASE_URL")
    api_key = api_key or os.environ.get("AFINA_API_KEY")
    if not (base_url and api_key):
        state = load_state(home)
        if state is None:
            raise SystemExit(f"no running afina found in {home}: run `afina up`, or set AFINA_BASE_URL and "
                             "AFINA_API_KEY")
        base_url = base_url or state.base_url
        api_key = api_key or state.api_key
    return base_url, api_key


def openai_client(home: Path, base_url: str | None = None, api_key: str | None = None):  # noqa: ANN201
    from openai import OpenAI

    url, key = connection(home, base_url, api_key)
    return OpenAI(base_url=url, api_key=key, max_retries=2, timeout=600)
