"""The images, checked without a container engine: every Dockerfile lints clean (hadolint), is multi-stage from
pinned bases and runs as a non-root user, and installs exactly its recorded contents (deploy/images/<service>.txt);
the gateway and ingest images carry no torch; the trainer's carries Unsloth and bitsandbytes on a CUDA runtime."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.unit.deploy.conftest import ROOT, run, tool

SERVICES = ["gateway", "ingest", "trainer", "exporter", "evaluator"]
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|xformers|bitsandbytes|nvidia-.*)$")


def compose_dockerfiles() -> dict[str, Path]:
    """The Dockerfile docker-compose.yml builds for each afina service."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {name: ROOT / services[name]["build"]["dockerfile"] for name in SERVICES}


def all_dockerfiles() -> list[Path]:
    found = set(compose_dockerfiles().values()) | set((ROOT / "services").glob("*/Dockerfile"))
    return sorted(found)


def lock(service: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "deploy" / "images" / f"{service}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.]+", version), f"{service}.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def stages(dockerfile: Path) -> list[tuple[str, list[str]]]:
    """(base image, the stage's instructions) for each FROM."""
    result: list[tuple[str, list[str]]] = []
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append((line.split()[1], []))
        else:
            result[-1][1].append(line)
    return result


@pytest.mark.parametrize("dockerfile", all_dockerfiles(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_dockerfile_lints_clean(dockerfile: Path) -> None:
    # DL3008: Debian packages follow the pinned base image's release; pip packages are pinned by the lock
    # (-c deploy/images/<service>.txt), which hadolint's DL3013 cannot see
    result = run([tool("hadolint"), "--ignore", "DL3008", "--ignore", "DL3013", "--failure-threshold", "warning",
                  str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install afina\n")
    result = run([tool("hadolint"), "--failure-threshold", "warning", str(bad)])
    assert result.returncode != 0 and "DL3007" in result.stdout  # the latest tag


@pytest.mark.parametrize("service", SERVICES)
def test_images_are_multi_stage_from_pinned_bases_and_run_as_non_root(service: str) -> None:
    dockerfile = compose_dockerfiles()[service]
    built = stages(dockerfile)
    assert len(built) >= 2, f"{dockerfile}: one stage; build tools must stay out of the final image"
    for base, _ in built:
        tag = base.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in base or (tag and tag != "latest" and re.search(r"\d", tag)), f"{base} is not pinned"
    final = built[-1][1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1] not in {"0", "root"}, f"{dockerfile}: the final stage runs as root"
    text = dockerfile.read_text()
    assert f"COPY deploy/images/{service}.txt constraints.txt" in text
    assert text.count("-c constraints.txt") >= 1, f"{dockerfile} does not install its recorded contents"


def test_the_trainer_image_is_a_cuda_runtime_with_unsloth_and_bitsandbytes() -> None:
    dockerfile = compose_dockerfiles()["trainer"]
    bases = [base for base, _ in stages(dockerfile)]
    assert all(re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", b) for b in bases), bases
    install = " ".join(line for _, lines in stages(dockerfile) for line in lines if "pip install" in line)
    for package in ("unsloth", "unsloth-zoo", "bitsandbytes", "./services/trainer"):
        assert package in install, package
    pins = lock("trainer")
    for package in ("torch", "unsloth", "unsloth-zoo", "bitsandbytes", "transformers", "trl", "peft"):
        assert package in pins, f"trainer.txt does not pin {package}"
    # what unsloth 2026.10.9 accepts (its metadata): the resolved lock must stay inside it
    caps = {"torch": ">=2.4.0,<2.15.0", "transformers": ">=4.52.4,<=5.17.0", "trl": ">=0.18.2,<=1.15.0",
            "datasets": ">=3.4.1,<5.0.0", "peft": ">=0.18.0", "bitsandbytes": ">=0.45.5"}
    for package, spec in caps.items():
        assert pins[package] in SpecifierSet(spec), (package, pins[package], spec)


@pytest.mark.parametrize("service", ["exporter", "evaluator"])
def test_the_exporter_and_evaluator_images_are_built_on_a_pinned_llama_cpp_image(service: str) -> None:
    bases = [base for base, _ in stages(compose_dockerfiles()[service])]
    assert all(re.fullmatch(r"ghcr\.io/ggml-org/llama\.cpp:full-b\d+", b) for b in bases), bases


def _direct_dependencies(service: str) -> set[str]:
    """The third-party distributions a service's own pyproject (and the core's) name, with the extras the
    image installs."""
    extras = {"gateway": {"llamacpp"}, "trainer": {"catalog"}, "exporter": {"catalog"},
              "evaluator": {"catalog"}}.get(service, set())
    names = set()
    for path in (ROOT / "services" / service / "pyproject.toml", ROOT / "shared" / "pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        lines = list(project["dependencies"])
        for extra in extras:
            lines += project.get("optional-dependencies", {}).get(extra, [])
        names |= {canonicalize_name(Requirement(line).name) for line in lines}
    return {name for name in names if not name.startswith("afina-")}


@pytest.mark.parametrize("service", SERVICES)
def test_each_lock_pins_every_dependency_its_service_declares(service: str) -> None:
    missing = _direct_dependencies(service) - set(lock(service))
    assert not missing, f"deploy/images/{service}.txt lacks {sorted(missing)}: run deploy/images/lock.py {service}"


@pytest.mark.parametrize("service", ["gateway", "ingest"])
def test_the_gateway_and_ingest_images_carry_no_torch(service: str) -> None:
    pinned = sorted(name for name in lock(service) if TORCH_FAMILY.match(name))
    assert not pinned, f"{service}.txt pins {pinned}"
    # and nothing their packages depend on (as installed here) pulls it in
    from deploy.images.lock import IMAGE_ROOTS, closure

    pulled = sorted(name for name in closure(IMAGE_ROOTS[service]) if TORCH_FAMILY.match(name))
    assert not pulled, f"the {service} image's dependencies pull in {pulled}"


def test_the_build_context_leaves_out_what_images_must_not_carry() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"**/.git", "**/.venv", ".env", "tests", "bench", "**/*.gguf"} <= ignored
