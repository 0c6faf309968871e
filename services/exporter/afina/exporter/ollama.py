"""Register an exported GGUF in the operator's Ollama (``AFINA_OLLAMA_URL``) with the official ``ollama`` client.

The steps are Ollama's own API since v0.5.5 (``docs/api.md``): the GGUF goes up as a blob addressed by its sha256
(``HEAD /api/blobs/…`` first, so a retry or a second fine-tune of one base uploads nothing twice), then
``create`` with ``files``, the family's Go ``template``, ``system`` and ``parameters`` (every stop token,
``num_ctx``, temperature): Ollama recognizes only chat templates it already knows, and a model without its
template and stops "talks gibberish or never stops". Then ``show`` checks that what was sent is what Ollama
holds, and a smoke chat checks that the model answers through Ollama.

With a LoRA-only GGUF, the base GGUF is the model file and the adapter goes in ``adapters`` (Ollama's
``ADAPTER``): Ollama stores blobs by digest, so every fine-tune of one base shares that base's blob.

An Ollama that is down, slow or refusing never fails the training: ``register_model_in_ollama`` returns an
``OllamaRegistration`` marked ``failed`` with a reason a tenant may read (the URL and Ollama's own file paths
left out), and the caller records it; a retry overwrites it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from afina.core.artifacts.publish import OllamaRegistration
from afina.core.catalog import ChatFamily
from afina.core.logging import log_event, redact
from afina.exporter.modelfile import DEFAULT_TEMPERATURE

log = logging.getLogger("afina.exporter.ollama")

WHERE = "Ollama (AFINA_OLLAMA_URL)"
MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
SMOKE_PROMPT = "Hello! Who are you?"
SMOKE_TOKENS = 16
HASH_CHUNK = 1 << 20
# Ollama's name parts (types/model/name.go), lower-case only here: a model and a tag start with a letter, digit
# or '_' and go on with those, '-' and '.'; a namespace has no '.'
MAX_PART = 80
_MODEL_PART = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,79}")
_NAMESPACE_PART = re.compile(r"[a-z0-9_][a-z0-9_-]{0,79}")
_NOT_IN_PART = re.compile(r"[^a-z0-9_.-]+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)")
SUFFIX_SLUG_MAX = 40


class OllamaError(RuntimeError):
    """Ollama could not do what was asked; the message is fit for the tenant (no URL, no paths)."""


# --- names ---------------------------------------------------------------------------------------------------

def is_valid_ollama_name(name: str) -> bool:
    """``[namespace/]model[:tag]`` in lower case, each part as Ollama's ``ParseName`` accepts it."""
    rest, _, tag = name.partition(":") if ":" in name else (name, "", "")
    if ":" in name and not _MODEL_PART.fullmatch(tag):
        return False
    namespace, slash, model = rest.rpartition("/")
    if slash and not _NAMESPACE_PART.fullmatch(namespace):
        return False
    return bool(_MODEL_PART.fullmatch(model))


def _slug(text: str) -> str:
    return _NOT_IN_PART.sub("-", text.lower()).strip("-._")


def _safe_prefix(prefix: str) -> str:
    """The tenant prefix as Ollama allows it; a prefix that had to change gets a hash of the original, so two
    tenants whose names differ only in characters Ollama refuses never share names."""
    namespace, slash, model_prefix = prefix.lower().rpartition("/")
    if slash:
        safe_namespace = re.sub(r"[^a-z0-9_-]+", "-", namespace).strip("-") or "afina"
        if safe_namespace != namespace:
            safe_namespace = f"{safe_namespace}-{hashlib.sha256(namespace.encode()).hexdigest()[:6]}"
        return f"{safe_namespace[:MAX_PART]}/{_safe_prefix(model_prefix)}"
    safe = _NOT_IN_PART.sub("-", model_prefix)
    if safe != model_prefix or (safe and not _MODEL_PART.match(safe[0])):
        safe = f"{safe.strip('-._') or 'tenant'}-{hashlib.sha256(model_prefix.encode()).hexdigest()[:6]}-"
    return safe


def ollama_model_name(prefix: str, requested_name: str | None, suffix: str | None, job_id: str) -> str:
    """The model's name in Ollama: the tenant's prefix (``settings.ollama_prefix_for(tenant)``), then the name
    the job asked for (``export.ollama.name``, ``model[:tag]``) or else ``<suffix>-<job id>``.

    Deterministic, so a retry registers under the same name and replaces what an earlier attempt left.
    ``ValueError`` when a requested name does not fit Ollama's 80 characters with the prefix.
    """
    safe_prefix = _safe_prefix(prefix)
    namespace, slash, model_prefix = safe_prefix.rpartition("/")
    if requested_name:
        model, colon, tag = requested_name.lower().partition(":")
        name = f"{namespace}{slash}{model_prefix}{model}{colon}{tag}"
        if len(model_prefix + model) > MAX_PART or not is_valid_ollama_name(name):
            raise ValueError(f"the Ollama name {model_prefix + model!r} is not valid in Ollama (lower-case letters, "
                             f"digits, '_', '-', '.', at most {MAX_PART} characters with the tenant prefix)")
        return name
    job_part = _slug(job_id)
    room = MAX_PART - len(model_prefix) - len(job_part) - 1
    if room < 0:
        raise ValueError(f"the tenant prefix {prefix!r} leaves no room for a model name in Ollama")
    suffix_part = _slug(suffix or "")[:min(room, SUFFIX_SLUG_MAX)].strip("-._")
    model = f"{model_prefix}{suffix_part}-{job_part}" if suffix_part else f"{model_prefix}{job_part}"
    return f"{namespace}{slash}{model}"


# --- what is sent, and how to check it landed ----------------------------------------------------------------

def ollama_create_request(*, name: str, family: ChatFamily, system: str | None, num_ctx: int, temperature: float,
                          model_digest: str, adapter_digest: str | None = None) -> dict[str, Any]:
    """The keyword arguments of ``ollama.Client.create``: never a Modelfile (Ollama refuses that body since
    v0.5.5), always the template and every stop token of the family."""
    request: dict[str, Any] = {
        "model": name,
        "files": {MODEL_FILE: model_digest},
        "template": family.ollama_template,
        "parameters": {"stop": list(family.stop), "num_ctx": num_ctx, "temperature": temperature},
    }
    if adapter_digest is not None:
        request["adapters"] = {ADAPTER_FILE: adapter_digest}
    if system:
        request["system"] = system
    return request


_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}


def _go_unquote(text: str) -> str:
    """A Go-quoted string (``strconv.Quote``, as ``%#v`` prints one) back to its value; bare text as is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    body, out, index = text[1:-1], [], 0
    while index < len(body):
        char = body[index]
        if char != "\\":
            out.append(char)
            index += 1
            continue
        code = body[index + 1]
        if code in _GO_ESCAPES:
            out.append(_GO_ESCAPES[code])
            index += 2
        else:
            width = {"x": 2, "u": 4, "U": 8}.get(code)
            if width is None:
                raise ValueError(f"unknown escape \\{code} in {text!r}")
            out.append(chr(int(body[index + 2:index + 2 + width], 16)))
            index += 2 + width
    return "".join(out)


def parse_show_parameters(text: str | None) -> dict[str, list[str]]:
    """``show``'s ``parameters`` (one ``name  value`` line per value, strings Go-quoted) as name -> values."""
    parsed: dict[str, list[str]] = {}
    for line in (text or "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            parsed.setdefault(key, []).append(_go_unquote(value.strip()))
    return parsed


def _modelfile_quote(text: str) -> str:
    """How Ollama writes an argument in the Modelfile ``show`` returns (``quote`` in parser/parser.go)."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def landed_problems(request: dict[str, Any], *, template: str | None, parameters: str | None,
                    modelfile: str | None) -> list[str]:
    """What ``show`` says differs from the create ``request`` (empty when everything landed)."""
    problems = []
    if (template or "") != request["template"]:
        problems.append("its template is not the family's")
    shown = parse_show_parameters(parameters)
    missing = [stop for stop in request["parameters"]["stop"] if stop not in shown.get("stop", [])]
    if missing:
        problems.append(f"stop tokens {missing} are missing")
    for key in ("num_ctx", "temperature"):
        try:
            landed = [float(value) for value in shown.get(key, [])] == [float(request["parameters"][key])]
        except ValueError:
            landed = False
        if not landed:
            problems.append(f"{key} is {shown.get(key)} instead of {request['parameters'][key]}")
    if request.get("system") and f"SYSTEM {_modelfile_quote(request['system'])}\n" not in (modelfile or ""):
        problems.append("its system prompt is not the one sent")
    return problems


def public_reason(text: str, url: str) -> str:
    """``text`` without the configured URL (or its host), absolute paths (their last part kept) or secrets."""
    host = re.sub(r"^[a-z][a-z0-9+.-]*://", "", url.rstrip("/"))
    for value in sorted({url.rstrip("/"), url, host}, key=len, reverse=True):
        if value:
            text = text.replace(value, "AFINA_OLLAMA_URL")
    return redact(_ABSOLUTE_PATH.sub(lambda match: f"…/{match.group(1)}", text))


# --- talking to Ollama ---------------------------------------------------------------------------------------

def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class _Failed(Exception):
    """A step failed for a reason already fit for the tenant."""


class _ProgressRaised(Exception):
    """``on_progress`` raised (a cancelled or fenced job): that is the caller's, not Ollama's, and propagates."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _reporter(on_progress: Callable[[str], None] | None) -> Callable[[str], None]:
    def report(line: str) -> None:
        if on_progress is None:
            return
        try:
            on_progress(line)
        except Exception as exc:
            raise _ProgressRaised(exc) from exc

    return report


@contextmanager
def _clients(url: str, timeout_s: float) -> Iterator[tuple[Any, Any]]:
    """The official client, and plain httpx for ``HEAD /api/blobs`` (the client has no call for it: its
    ``create_blob`` always uploads)."""
    import httpx
    import ollama

    with ollama.Client(host=_base_url(url), timeout=timeout_s) as client, \
            httpx.Client(base_url=_base_url(url), timeout=timeout_s) as http:
        yield client, http


def _ensure_blob(client: Any, http: Any, path: Path, digest: str, report: Callable[[str], None]) -> str:
    """Upload ``path`` unless Ollama has its digest; the client's own digest must be the one checked."""
    answer = http.head(f"/api/blobs/{digest}")
    if answer.status_code == 200:
        report(f"blob {digest[:19]} already in Ollama")
        return digest
    if answer.status_code != 404:
        raise _Failed(f"{WHERE} answered {answer.status_code} when asked for blob {digest}")
    report(f"uploading {path.name} ({path.stat().st_size} bytes) to Ollama")
    uploaded = client.create_blob(path)
    if uploaded != digest:
        raise _Failed(f"{path.name} changed while it was uploaded (sha256 {digest} before, {uploaded} sent)")
    return digest


def _create(client: Any, request: dict[str, Any], report: Callable[[str], None]) -> None:
    last = None
    for progress in client.create(**request, stream=True):
        last = progress.status
        if last and last != "success":
            report(f"ollama create: {last}")
    if last != "success":
        raise _Failed(f"{WHERE} ended the create of {request['model']} without success (last status: {last})")


def _smoke_chat(client: Any, name: str) -> str:
    answer = client.chat(model=name, messages=[{"role": "user", "content": SMOKE_PROMPT}], stream=False,
                         options={"num_predict": SMOKE_TOKENS, "temperature": 0, "seed": 0}, keep_alive=0)
    text = (answer.message.content or "").strip()
    if not text:
        raise _Failed(f"{name} is in {WHERE} but its smoke chat answered nothing "
                      f"(done_reason {answer.done_reason!r})")
    return text


def _reason(exc: BaseException, step: str, url: str, timeout_s: float) -> str:
    import httpx
    import ollama

    if isinstance(exc, _Failed):
        return public_reason(str(exc), url)
    if isinstance(exc, ollama.ResponseError):
        status = f" ({exc.status_code})" if exc.status_code and exc.status_code > 0 else ""
        return f"{WHERE} refused {step}{status}: {public_reason(str(exc.error), url)}"
    if isinstance(exc, httpx.TimeoutException):
        return f"{WHERE} did not answer within {timeout_s:g}s while {step}"
    if isinstance(exc, ConnectionError | httpx.ConnectError):
        return f"{WHERE} is not reachable (connection refused) while {step}"
    if isinstance(exc, httpx.TransportError):
        return f"the connection to {WHERE} broke while {step} ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return f"could not read the GGUF to register while {step}: {exc.strerror or type(exc).__name__}"
    return f"{step} failed: {public_reason(f'{type(exc).__name__}: {exc}', url)}"


def register_model_in_ollama(*, url: str, name: str, gguf_path: Path, family: ChatFamily, system: str | None,
                             num_ctx: int, timeout_s: float, variant: str | None = None,
                             temperature: float = DEFAULT_TEMPERATURE, adapter_gguf: Path | None = None,
                             gguf_sha256: str | None = None,
                             on_progress: Callable[[str], None] | None = None) -> OllamaRegistration:
    """Register ``gguf_path`` in the Ollama at ``url`` as ``name``, check it, and smoke-chat it; never raises for
    Ollama's failures (the record says ``failed`` and why).

    ``adapter_gguf``: a LoRA-only GGUF served over ``gguf_path`` (then the base GGUF) through Ollama's ``ADAPTER``.
    ``gguf_sha256``: the digest from the export manifest (``sha256:<hex>`` or bare hex), to skip hashing again.
    ``timeout_s``: the longest Ollama may stay silent (each connect, read and write).
    ``on_progress``: receives a short line per step (for the job's events); what it raises propagates.
    """
    report = _reporter(on_progress)
    started = time.monotonic()
    step = "checking the name"
    digest: str | None = None
    created = False
    try:
        if not is_valid_ollama_name(name):
            raise _Failed(f"{name!r} is not a valid Ollama model name")
        step = "hashing the GGUF"
        if gguf_sha256:
            digest = gguf_sha256 if gguf_sha256.startswith("sha256:") else f"sha256:{gguf_sha256}"
        else:
            digest = file_sha256(gguf_path)
        adapter_digest = file_sha256(adapter_gguf) if adapter_gguf is not None else None
        with _clients(url, timeout_s) as (client, http):
            step = "uploading the GGUF"
            _ensure_blob(client, http, gguf_path, digest, report)
            if adapter_gguf is not None and adapter_digest is not None:
                step = "uploading the LoRA adapter GGUF"
                _ensure_blob(client, http, adapter_gguf, adapter_digest, report)
            request = ollama_create_request(name=name, family=family, system=system, num_ctx=num_ctx,
                                            temperature=temperature, model_digest=digest,
                                            adapter_digest=adapter_digest)
            step = f"creating {name}"
            _create(client, request, report)
            created = True
            report(f"{name} created in Ollama")
            step = f"showing {name}"
            shown = client.show(name)
            problems = landed_problems(request, template=shown.template, parameters=shown.parameters,
                                       modelfile=shown.modelfile)
            if problems:
                raise _Failed(f"{name} in {WHERE} is not what was sent: {'; '.join(problems)}")
            step = f"the smoke chat with {name}"
            answer = _smoke_chat(client, name)
            report(f"{name} answered the smoke chat in Ollama ({len(answer)} characters)")
    except _ProgressRaised as exc:
        if created:
            _forget_unverified(url, name, timeout_s)
        raise exc.original from None
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none fails the training
        reason = _reason(exc, step, url, timeout_s)
        if created:
            _forget_unverified(url, name, timeout_s)
        log_event(log, "ollama.registration_failed", logging.WARNING, name=name, step=step, reason=reason)
        return OllamaRegistration(name=name, status="failed", variant=variant, digest=digest, error=reason,
                                  updated_at=int(time.time()))
    log_event(log, "ollama.registered", name=name, digest=digest, variant=variant,
              seconds=round(time.monotonic() - started, 2))
    return OllamaRegistration(name=name, status="registered", variant=variant, digest=digest,
                              updated_at=int(time.time()))


def _forget_unverified(url: str, name: str, timeout_s: float) -> None:
    """A created model that did not pass the checks is deleted, so nothing half-working stays listed."""
    try:
        delete_model_from_ollama(url, name, timeout_s)
    except OllamaError as exc:
        log_event(log, "ollama.cleanup_failed", logging.WARNING, name=name, reason=str(exc))


def delete_model_from_ollama(url: str, name: str, timeout_s: float) -> None:
    """Delete ``name`` in the Ollama at ``url``; a model already gone is fine. ``OllamaError`` otherwise."""
    import httpx
    import ollama

    try:
        with ollama.Client(host=_base_url(url), timeout=timeout_s) as client:
            client.delete(name)
    except ollama.ResponseError as exc:
        if exc.status_code == 404:
            return
        raise OllamaError(_reason(exc, f"deleting {name}", url, timeout_s)) from None
    except (ConnectionError, httpx.HTTPError) as exc:
        raise OllamaError(_reason(exc, f"deleting {name}", url, timeout_s)) from None
    log_event(log, "ollama.deleted", name=name)
