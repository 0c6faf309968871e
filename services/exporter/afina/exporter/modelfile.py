"""The Ollama ``Modelfile`` shipped next to the GGUF files.

Ollama recognizes only chat templates it already knows; for anything else it
guesses and the model "talks gibberish or never stops". The Modelfile therefore
always spells out the family's Go template and every stop token.
"""

from __future__ import annotations

from afina.core.catalog import ChatFamily

DEFAULT_TEMPERATURE = 0.7
DEFAULT_NUM_CTX = 2048


def render_modelfile(gguf_filename: str, family: ChatFamily, *, temperature: float = DEFAULT_TEMPERATURE,
                     num_ctx: int = DEFAULT_NUM_CTX) -> str:
    """A Modelfile whose ``FROM`` is the GGUF next to it (``./<gguf_filename>``)."""
    if '"""' in family.ollama_template:
        raise ValueError(f"the {family.name} Ollama template contains triple quotes and cannot go in a Modelfile")
    lines = [f"FROM ./{gguf_filename}", f'TEMPLATE """{family.ollama_template}"""']
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in family.stop]
    lines += [f"PARAMETER temperature {temperature}", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
