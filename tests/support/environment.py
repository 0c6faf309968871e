"""Settings read from a deployment's environment the way its processes read them (pydantic-settings parses
the JSON of dict and list variables), not passed as keyword arguments."""

from __future__ import annotations

import os
from unittest import mock

from afina.core.settings import Settings


def settings_from_environment(environment: dict[str, str]) -> Settings:
    """``Settings()`` in a process whose ``AFINA_*`` variables are exactly those of ``environment``."""
    kept = {key: value for key, value in os.environ.items() if not key.startswith("AFINA_")}
    afina = {key: value for key, value in environment.items() if key.startswith("AFINA_")}
    with mock.patch.dict(os.environ, {**kept, **afina}, clear=True):
        return Settings()
