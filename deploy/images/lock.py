"""Write each image's pinned contents (deploy/images/<service>.txt) from the packages this environment resolved.

    .venv/bin/python deploy/images/lock.py            # rewrite every lock
    .venv/bin/python deploy/images/lock.py gateway    # one

A lock is what the service's Dockerfile installs with ``pip install -c <lock>``. The gateway, ingest,
exporter and evaluator locks hold every distribution the service's packages need (their dependency closure,
walked through the installed metadata) at the version installed here, which the test suite ran against. The trainer's
needs packages this CPU environment does not install (Unsloth, bitsandbytes) and older versions that Unsloth
caps (transformers, TRL, datasets): its lock is pip's own resolution (``pip install --dry-run --report``,
PyPI reached) of the trainer with ``GPU_PINS``.
tests/unit/deploy/test_images.py checks the locks against the services' pyproject files.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
# what each image installs: distribution name and extras (afina's own packages are installed from source)
IMAGE_ROOTS: dict[str, list[tuple[str, set[str]]]] = {
    "gateway": [("afina-gateway", {"llamacpp"}), ("afina-core", set()), ("openai", set())],
    "ingest": [("afina-ingest", set()), ("afina-core", set())],
    "trainer": [("afina-trainer", set()), ("afina-core", {"catalog"})],
    "exporter": [("afina-exporter", set()), ("afina-core", {"catalog"})],
    "evaluator": [("afina-evaluator", set()), ("afina-core", {"catalog"})],
}
# the trainer image on CUDA: Unsloth, bitsandbytes and Liger, and the torch/transformers/TRL versions that
# unsloth 2026.10.9 accepts (torch<2.15, transformers<=5.17.0, trl<=1.15.0)
GPU_PINS = {
    "unsloth": "2026.10.9",
    "unsloth-zoo": "2026.10.9",
    "bitsandbytes": "0.50.2",
    "liger-kernel": "0.8.5",  # the hf backend's fused kernels (afina.trainer.kernels)
    "torch": "2.13.0",
    "transformers": "5.17.0",
    "trl": "1.15.0",
    "datasets": "4.8.5",
}


def source_requirements(name: str) -> list[str] | None:
    """An afina package's requirements as its pyproject.toml says now (its installed metadata is as old as
    the last ``make install``); None for any other distribution."""
    import tomllib

    folder = {"afina-core": "shared"}.get(canonicalize_name(name))
    if folder is None and canonicalize_name(name).startswith("afina-"):
        folder = f"services/{canonicalize_name(name).removeprefix('afina-')}"
    pyproject = HERE.parents[1] / folder / "pyproject.toml" if folder else None
    if pyproject is None or not pyproject.exists():
        return None
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra, extra_lines in project.get("optional-dependencies", {}).items():
        lines += [f"{line}; extra == '{extra}'" if ";" not in line else f"{line} and extra == '{extra}'"
                  for line in extra_lines]
    return lines


def closure(roots: list[tuple[str, set[str]]]) -> dict[str, str]:
    """{canonical name: installed version} of every distribution the roots need, themselves included."""
    found: dict[str, str] = {}
    pending = list(roots)
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        key = (canonicalize_name(name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        distribution = metadata.distribution(name)
        found[canonicalize_name(name)] = distribution.version.split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
        for line in source_requirements(name) or distribution.requires or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                pending.append((requirement.name, set(requirement.extras)))
    return found


def resolved(service_dirs: list[str], pins: dict[str, str]) -> dict[str, str]:
    """{canonical name: version} that pip resolves for the given source folders under ``pins`` (PyPI)."""
    import json
    import subprocess
    import tempfile

    root = HERE.parents[1]
    with tempfile.TemporaryDirectory() as scratch:
        constraints = Path(scratch, "constraints.txt")
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
        report = Path(scratch, "report.json")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-c", str(constraints), *service_dirs, *pins],
                       cwd=root, check=True)
        installs = json.loads(report.read_text())["install"]
    # a local build tag (torch 2.13.0+cpu from a local wheel here) is dropped: the image takes PyPI's CUDA build
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"].split("+")[0] for item in installs}


def lock_lines(service: str) -> list[str]:
    if service == "trainer":
        pins = resolved(["./shared[catalog]", "./services/trainer"], GPU_PINS)
    else:
        pins = closure(IMAGE_ROOTS[service])
    pins = {name: version for name, version in pins.items() if not name.startswith("afina-")}
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def write_lock(service: str) -> Path:
    path = HERE / f"{service}.txt"
    header = (f"# The {service} image's Python contents: pip install -c deploy/images/{service}.txt (its Dockerfile).\n"
              "# Generated by deploy/images/lock.py from the environment the tests ran in; checked by\n"
              "# tests/unit/deploy/test_images.py. Regenerate after changing a service's dependencies.\n")
    path.write_text(header + "\n".join(lock_lines(service)) + "\n")
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or list(IMAGE_ROOTS):
        print(write_lock(name))
