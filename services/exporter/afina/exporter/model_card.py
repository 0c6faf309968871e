"""The ``README.md`` model card a Hub publication carries: metadata the Hub indexes, then what a reader needs.

The YAML front matter is what the Hub reads (``base_model`` and its relation put the model in the base
model's tree, ``library_name`` and ``tags`` make it findable, ``license`` is checked against the Hub's list,
``pipeline_tag`` sets the widget); afina's own figures (the training and the fidelity gate) go under an
``afina`` key, exactly as measured, so a program can read them back. The body says what the model is, how to
run it with Ollama (the shipped Modelfile, which spells out the template and stop tokens) or llama.cpp, what
training it had, and how closely each GGUF answers like the trained model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import yaml

from afina.core.artifacts import AdapterManifest
from afina.core.artifacts.evaluation import QualityGate
from afina.core.artifacts.fidelity import FidelityReport
from afina.core.catalog import BaseModelSpec

# a base model the Hub can link to: "namespace/name" (a local path or a store URI is not one)
_HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
UNKNOWN_LICENSE = "other"


def render_model_card(*, repo_id: str, base: BaseModelSpec, adapter: AdapterManifest,
                      gguf_files: Mapping[str, str], served_variant: str | None = None,
                      adapter_dir: str | None = None, modelfile: str | None = None,
                      hyperparameters: Mapping[str, object] | None = None,
                      fidelity: FidelityReport | Mapping[str, object] | None = None, license_id: str | None = None,
                      language: str | Sequence[str] | None = None, model_name: str | None = None,
                      quality_gate: QualityGate | None = None) -> str:
    """The card for ``repo_id`` (``namespace/name``, as published).

    ``gguf_files`` maps each published GGUF variant to its path in the repository (empty when only the
    adapter is published); ``adapter_dir`` is the folder holding the PEFT adapter, when it is published;
    ``modelfile`` the text of the shipped ``Modelfile``. ``license_id`` is a Hub license identifier (the base
    model's); without one the card says ``other`` and points at the base model's terms. ``fidelity`` is the
    fidelity gate's report (or its figures as a mapping), rendered unrounded. ``model_name`` is the model's
    name in afina (``ft:...``). ``quality_gate`` is the evaluation's verdict, when the model was evaluated before
    it was published (always so when the operator enforces the gate).
    """
    languages = [language] if isinstance(language, str) else list(language or [])
    figures = fidelity_figures(fidelity) if isinstance(fidelity, FidelityReport) else dict(fidelity or {})
    metadata = _metadata(base=base, adapter=adapter, gguf=bool(gguf_files), license_id=license_id,
                         languages=languages, hyperparameters=hyperparameters or {}, fidelity=figures)
    if quality_gate is not None:
        metadata["afina"]["quality_gate"] = quality_gate.model_dump(mode="json")
    front_matter = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000)
    sections = [
        _introduction(repo_id, base, adapter, gguf_files, served_variant, adapter_dir, model_name),
        _files_section(gguf_files, served_variant, adapter_dir, modelfile),
        _usage_section(repo_id, gguf_files, served_variant, adapter_dir, modelfile, adapter.hf_repo),
        _training_section(adapter, hyperparameters or {}),
        _fidelity_section(figures),
        _quality_gate_section(quality_gate),
    ]
    if license_id is None:
        sections.append("## License\n\nThe license of the base model applies"
                        + (f": see [{adapter.hf_repo}](/{adapter.hf_repo})." if _hub_id(adapter.hf_repo) else "."))
    return f"---\n{front_matter}---\n\n" + "\n\n".join(section for section in sections if section) + "\n"


def fidelity_figures(report: FidelityReport) -> dict[str, object]:
    """The gate's headline figures: the verdict, what was compared, the limits, and per variant its agreement
    and perplexity (the per-prompt mismatches stay in ``verification.json``)."""
    figures: dict[str, object] = {
        "passed": report.passed, "prompts": report.prompts, "texts": report.texts,
        "perplexity_tokens": report.perplexity_tokens, "tolerances": report.tolerances.model_dump(mode="json"),
        "reference": {"dtype": report.reference.dtype, "perplexity": report.reference.perplexity},
        "variants": {name: {"compared_with": variant.compared_with, "agreement": variant.agreement,
                            "agreement_with_reference": variant.agreement_with_reference,
                            "perplexity": variant.perplexity, "perplexity_ratio": variant.perplexity_ratio}
                     for name, variant in report.variants.items()},
    }
    if report.failures:
        figures["failures"] = list(report.failures)
    return figures


def _metadata(*, base: BaseModelSpec, adapter: AdapterManifest, gguf: bool, license_id: str | None,
              languages: list[str], hyperparameters: Mapping[str, object],
              fidelity: Mapping[str, object]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if _hub_id(adapter.hf_repo):
        metadata["base_model"] = adapter.hf_repo
        # the weights are a fine-tune of the base (in GGUF), or an adapter on it: not a mere quantization
        metadata["base_model_relation"] = "finetune" if gguf else "adapter"
    metadata["library_name"] = "gguf" if gguf else "peft"
    metadata["license"] = license_id or UNKNOWN_LICENSE
    if license_id is None:
        metadata["license_name"] = "base-model-license"
    if languages:
        metadata["language"] = languages
    tags = ["afina", *(["gguf"] if gguf else []), "lora", base.family.name, *languages]
    metadata["tags"] = list(dict.fromkeys(tags))
    metadata["pipeline_tag"] = "text-generation"
    metadata["afina"] = {
        "job": adapter.job_id,
        "base_model": adapter.base_model,
        "chat_family": adapter.chat_family,
        "training": {"steps": adapter.global_step, "trained_tokens": adapter.trained_tokens,
                     "lora": adapter.lora.model_dump(mode="json"), "hyperparameters": _plain(hyperparameters)},
        "fidelity": _plain(fidelity),
    }
    return metadata


def _introduction(repo_id: str, base: BaseModelSpec, adapter: AdapterManifest, gguf_files: Mapping[str, str],
                  served_variant: str | None, adapter_dir: str | None, model_name: str | None) -> str:
    name = repo_id.rsplit("/", 1)[-1]
    base_link = f"[{base.display_name}](/{adapter.hf_repo})" if _hub_id(adapter.hf_repo) else base.display_name
    packaged = []
    if gguf_files:
        packaged.append("GGUF files for llama.cpp and Ollama (" + ", ".join(v.upper() for v in gguf_files) + ")")
    if adapter_dir is not None:
        packaged.append(f"the LoRA adapter itself (PEFT, in `{adapter_dir}/`)")
    text = (f"# {name}\n\nA LoRA fine-tune of {base_link} ({_parameters(base.parameters)} parameters, "
            f"{base.family.display_name} chat format), trained and exported by afina (job `{adapter.job_id}`).")
    if packaged:
        text += " This repository holds " + " and ".join(packaged) + "."
    if model_name is not None:
        text += f" In afina it is `{model_name}`"
        text += f", served from the {served_variant.upper()} file." if served_variant in gguf_files else "."
    return text


def _files_section(gguf_files: Mapping[str, str], served_variant: str | None, adapter_dir: str | None,
                   modelfile: str | None) -> str:
    rows = [f"| `{path}` | GGUF {variant.upper()}{' (served)' if variant == served_variant else ''} |"
            for variant, path in gguf_files.items()]
    if modelfile is not None:
        rows.append("| `Modelfile` | Ollama: the template, stop tokens and parameters |")
    if adapter_dir is not None:
        rows.append(f"| `{adapter_dir}/` | the LoRA adapter (PEFT `adapter_config.json` and weights) |")
    if not rows:
        return ""
    return "## Files\n\n| File | What it is |\n| --- | --- |\n" + "\n".join(rows)


def _usage_section(repo_id: str, gguf_files: Mapping[str, str], served_variant: str | None,
                   adapter_dir: str | None, modelfile: str | None, base_repo: str) -> str:
    name = repo_id.rsplit("/", 1)[-1].lower()
    parts = ["## How to run it\n\nWhile the repository is private, downloading needs a token: set `HF_TOKEN`, or "
             "run `hf auth login` first."]
    gguf_path = gguf_files.get(served_variant or "") or next(iter(gguf_files.values()), None)
    if gguf_path is not None and modelfile is not None:
        parts.append("### Ollama\n\nThe `Modelfile` spells out the chat template and every stop token (Ollama guesses "
                     "them otherwise, and a guessed template talks gibberish or never stops):\n\n"
                     f"```sh\nhf download {repo_id} {gguf_path} Modelfile --local-dir {name}\n"
                     f"cd {name}\nollama create {name} -f Modelfile\nollama run {name}\n```\n\n"
                     f"```\n{modelfile.rstrip()}\n```")
    if gguf_path is not None:
        parts.append("### llama.cpp\n\n"
                     f"```sh\nhf download {repo_id} {gguf_path} --local-dir {name}\n"
                     f"llama-server -m {name}/{gguf_path} --jinja\n```\n\n"
                     "`--jinja` formats chats with the template stored in the GGUF; the server answers "
                     "OpenAI-style requests at `http://localhost:8080/v1/chat/completions`.")
    if adapter_dir is not None and _hub_id(base_repo):
        parts.append("### transformers and PEFT\n\n"
                     "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                     f'base = AutoModelForCausalLM.from_pretrained("{base_repo}")\n'
                     f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{adapter_dir}")\n```')
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _training_section(adapter: AdapterManifest, hyperparameters: Mapping[str, object]) -> str:
    lora = adapter.lora
    rows = [("steps", adapter.global_step), ("trained tokens", adapter.trained_tokens), ("LoRA rank", lora.r),
            ("LoRA alpha", lora.alpha), ("LoRA dropout", lora.dropout), ("rsLoRA", lora.use_rslora),
            ("target modules", ", ".join(lora.target_modules))]
    if lora.modules_to_save:
        rows.append(("modules trained in full", ", ".join(lora.modules_to_save)))
    rows += [(str(key), value) for key, value in hyperparameters.items()]
    return "## Training\n\n| | |\n| --- | --- |\n" + "\n".join(f"| {key} | {_figure(value)} |" for key, value in rows)


def _fidelity_section(fidelity: Mapping[str, object]) -> str:
    """The gate's figures as measured: scalars as a list, a mapping of mappings (per variant) as a table."""
    if not fidelity:
        return ""
    lines = ["## Fidelity", "",
             "How closely the GGUF files answer like the trained model (greedy tokens on held-out prompts, "
             "perplexity on the validation texts), as afina's fidelity gate measured them:", ""]
    for key, value in fidelity.items():
        table = _table_rows(value)
        if table is not None:
            columns = list(dict.fromkeys(column for inner in table.values() for column in inner))
            lines += ["", f"**{key}**", "", f"| {key} | " + " | ".join(columns) + " |",
                      "| --- |" + " --- |" * len(columns)]
            lines += [f"| {row} | " + " | ".join(_figure(inner.get(column)) for column in columns) + " |"
                      for row, inner in table.items()]
            lines.append("")
        elif isinstance(value, Mapping):
            lines += [f"- **{key}**:"] + [f"  - {inner_key}: {_figure(inner)}" for inner_key, inner in value.items()]
        else:
            lines.append(f"- **{key}**: {_figure(value)}")
    return "\n".join(lines).rstrip()


def _quality_gate_section(gate: QualityGate | None) -> str:
    """The evaluation's verdict: each rule with the two figures it compared and its limit, unrounded."""
    if gate is None:
        return ""
    lines = ["## Quality gate", "",
             f"afina evaluated this model against its base and its 16-bit GGUF on held-out examples (main metric "
             f"`{gate.main_metric}`): the gate **{'passed' if gate.passed else 'failed'}**.", "",
             "| rule | model | value | compared with | limit | result |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c.rule} | {c.model} | {_figure(c.value)} | {c.against} {_figure(c.reference)} | {_figure(c.limit)} "
              f"| {'pass' if c.passed else 'FAIL'} |" for c in gate.checks]
    return "\n".join(lines)


def _table_rows(value: object) -> dict[str, Mapping[str, object]] | None:
    """``value`` as table rows when it is a non-empty mapping of mappings (figures per variant), else None."""
    if not isinstance(value, Mapping) or not value or not all(isinstance(inner, Mapping) for inner in value.values()):
        return None
    return {str(row): inner for row, inner in value.items()}


def _figure(value: object) -> str:
    """A figure exactly as measured: a float by its shortest round-trip form (never rounded)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return repr(float(value))
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(_plain(value), ensure_ascii=False)
    return str(value).replace("|", "\\|")


def _plain(value: object) -> Any:
    """``value`` as YAML-safe builtins (numbers stay numbers, exact; anything else becomes text)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(inner) for inner in value]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    return str(value)


def _hub_id(repo: str) -> bool:
    return bool(_HUB_MODEL_ID.fullmatch(repo)) and ".." not in repo


def _parameters(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)
