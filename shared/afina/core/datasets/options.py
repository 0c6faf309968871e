"""How an uploaded file becomes training examples: the ingest options a user sends with a file.

The gateway validates these at upload (a bad option is a 400 naming the field), stores
them with the file, and the ingest worker reads them back; the CLI sends the same
object (``afina push --format columns --user-template ...`` or ``--options file.yaml``).
Everything defaults to "detect it": most uploads need no options at all.

Kept in ``afina.core`` because both the gateway (no ML dependencies) and the ingest
worker need the schema.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from afina.core.datasets.formats import RECORD_FORMATS_BY_NAME

# ``afina.core.datasets.formats.RECORD_FORMATS``'s names, spelled out for the schema (a test checks they agree)
DatasetFormat = Literal[
    "auto",  # detect from the first records
    "openai",  # {"messages": [{"role", "content"}, ...]}
    "sharegpt",  # {"conversations": [{"from": "human"|"gpt"|..., "value"}]}
    "alpaca",  # {"instruction", "input"?, "output"}
    "prompt_completion",  # {"prompt", "completion"}
    "text",  # {"text"} or plain text lines/files: continued pretraining
    "columns",  # any columns, mapped with templates (see ColumnMapping)
    "transcript",  # a chat log with speaker prefixes (see TranscriptOptions)
    "paired",  # an archive of input files and expected-output files paired by base name
]
# the containers of ``afina.core.datasets.formats.CONTAINERS`` that may be declared (a test checks); a
# compressed or encrypted file is told by its bytes and ``encryption``, and holds one of these
ContainerFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "txt", "zip", "tar"]

# Portuguese split names as users write them (001_*) -> afina's names
SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "treino": "train", "training": "train",
    "validation": "validation", "validacao": "validation", "validação": "validation", "valid": "validation",
    "val": "validation", "eval": "validation",
    "test": "test", "teste": "test",
}
SPLIT_NAMES = ("train", "validation", "test")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnMapping(StrictModel):
    """Build a conversation from arbitrary columns: each role is a template over the row's columns.

    ``{title}`` is replaced by the row's ``title`` column; text without braces is a constant
    (``"DESCRIBE ABOUT THE PRODUCT.\\nTitle: {title}"``). A row whose template names a missing or
    empty column is dropped and reported (``required_columns`` adds columns that must be non-empty).
    """

    system: str | None = None
    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)
    required_columns: list[str] = Field(default_factory=list)


# ignore_patterns run on every line of a transcript (up to 128 MiB of text). The engine is RE2: its
# time is linear in the line (no backtracking, so ``^(a|a)*$`` cannot explode) and proportional to the
# compiled patterns' size, which these caps bound; all are checked when the options are parsed.
# Measured worst case at the cap: ~0.2 s per MiB of text on one core.
MAX_IGNORE_PATTERNS = 32
MAX_IGNORE_PATTERN_CHARS = 512
MAX_IGNORE_PROGRAM_SIZE = 5000  # RE2 instructions, all patterns together: ``\p{L}+`` is 1201, ``.{300}`` 2404
MAX_SPEAKERS = 32
MAX_SPEAKER_PREFIX_CHARS = 40  # the transcript parser looks for a prefix in a line's first 40 characters


def compile_ignore_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (an ``re2`` pattern object: ``.search(line)``); ``ValueError`` saying why not.

    RE2 has Python's syntax without what needs backtracking: no back-references (``\\1``) and no
    look-arounds (``(?=``, ``(?<=``). ``\\w``, ``\\d`` and ``\\b`` are ASCII-only there; ``\\p{L}`` is
    any letter.
    """
    import re2

    if len(pattern) > MAX_IGNORE_PATTERN_CHARS:
        raise ValueError(f"is {len(pattern)} characters long; at most {MAX_IGNORE_PATTERN_CHARS} are allowed")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 8 << 20
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) \
            else str(exc)
        hint = " (back-references and look-arounds are not supported: patterns run with RE2, which never " \
               "backtracks)" if "perl operator" in reason or "escape sequence" in reason else ""
        raise ValueError(f"is not a regular expression afina can run: {reason}{hint}") from None
    return compiled


class TranscriptOptions(StrictModel):
    """A chat log as text: lines starting with a speaker prefix open a turn; other lines continue it.

    By default every answered user turn becomes one example (``max_turns_per_example``).

    Lines matching one of ``ignore_patterns`` (regular expressions, run with RE2: see
    ``compile_ignore_pattern``) are noise and skipped; a turn the other side never answered is
    dropped; a blank-line run of ``conversation_gap`` lines or more (0 = never) starts a new
    conversation.
    """

    speakers: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: {"VOCÊ:": "user", "AEON:": "assistant"})
    ignore_patterns: list[str] = Field(default_factory=list)
    conversation_gap: int = Field(default=2, ge=0)
    # exchanges (a user turn and its answer) per example: 1, as a chat-log converter does it (seed 003_*),
    # makes each answered question its own example; 0 keeps each whole conversation as one example
    max_turns_per_example: int = Field(default=1, ge=0)

    @field_validator("speakers")
    @classmethod
    def _needs_both_sides(cls, value: dict[str, str]) -> dict[str, str]:
        roles = set(value.values())
        if not {"user", "assistant"} <= roles:
            raise ValueError("speakers must map at least one prefix to 'user' and one to 'assistant'")
        if len(value) > MAX_SPEAKERS:
            raise ValueError(f"{len(value)} speakers given; at most {MAX_SPEAKERS} are allowed")
        for prefix in value:
            if len(prefix.strip()) > MAX_SPEAKER_PREFIX_CHARS:
                raise ValueError(f"speaker prefix {prefix[:MAX_SPEAKER_PREFIX_CHARS]!r}... is longer than "
                                 f"{MAX_SPEAKER_PREFIX_CHARS} characters; a prefix is matched at the start of a line")
        return value

    @field_validator("ignore_patterns")
    @classmethod
    def _patterns_run_in_linear_time(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_IGNORE_PATTERNS:
            raise ValueError(f"{len(value)} patterns given; at most {MAX_IGNORE_PATTERNS} are allowed")
        program_size = 0
        for index, pattern in enumerate(value):
            try:
                program_size += compile_ignore_pattern(pattern).programsize
            except ValueError as exc:
                raise ValueError(f"transcript.ignore_patterns[{index}] {exc}") from None
            if program_size > MAX_IGNORE_PROGRAM_SIZE:
                raise ValueError(f"transcript.ignore_patterns[{index}] brings the compiled patterns to {program_size} "
                                 f"instructions, over the limit of {MAX_IGNORE_PROGRAM_SIZE}; use shorter patterns "
                                 f"(large {{n}} repetitions cost the most)")
        return value


class PairedOptions(StrictModel):
    """Inputs and expected outputs in two folders of an archive, paired by file base name."""

    inputs_dir: str = "inputs"
    outputs_dir: str = "outputs"
    prompt_template: str = "{input}"  # {input} is the input file's text, {name} its base name


class EncryptionOptions(StrictModel):
    """Fernet-encrypted data (001_*): the key is read from the environment variable named here.

    ``fields`` lists the columns/fields whose values are Fernet tokens; ``whole_file`` means the upload
    itself is one Fernet token. The key never appears in logs, reports or errors.
    """

    key_env: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    fields: list[str] = Field(default_factory=list)
    whole_file: bool = False

    @model_validator(mode="after")
    def _something_to_decrypt(self) -> EncryptionOptions:
        if not self.fields and not self.whole_file:
            raise ValueError("name the encrypted 'fields' or set 'whole_file': true")
        return self


class SplitOptions(StrictModel):
    """Named proportions (``treino``/``validacao``/``teste`` accepted), summing to 1."""

    proportions: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "validation": 0.1, "test": 0.0})
    min_examples: dict[str, int] = Field(default_factory=lambda: {"train": 10})
    split_column: str | None = "split"  # a record's own split (user-supplied split files/columns) wins

    @field_validator("proportions", mode="before")
    @classmethod
    def _accept_list_of_pairs(cls, value: Any) -> Any:
        # YAML as 001_* writes it: "- treino: 0.7" gives a list of one-key dicts
        if isinstance(value, list):
            merged: dict[str, Any] = {}
            for item in value:
                if not isinstance(item, dict):
                    raise ValueError("proportions must be a mapping like {treino: 0.8, validacao: 0.1, teste: 0.1}")
                merged.update(item)
            return merged
        return value

    @field_validator("proportions")
    @classmethod
    def _canonical_names_sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        canonical: dict[str, float] = dict.fromkeys(SPLIT_NAMES, 0.0)
        for name, share in value.items():
            key = SPLIT_ALIASES.get(name.strip().lower())
            if key is None:
                raise ValueError(f"unknown split name {name!r}; use train/treino, validation/validacao, test/teste")
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"proportion of {name!r} must be between 0 and 1, got {share}")
            canonical[key] += share
        total = sum(canonical.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"proportions must sum to 1, they sum to {total:g}")
        if canonical["train"] <= 0:
            raise ValueError("the train proportion must be above 0")
        return canonical

    @field_validator("min_examples", mode="before")
    @classmethod
    def _canonical_min_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for name, count in value.items():
                key = SPLIT_ALIASES.get(str(name).strip().lower())
                if key is None:
                    raise ValueError(f"unknown split name {name!r}")
                out[key] = count
            return out
        return value


class IngestOptions(StrictModel):
    """Everything ingest needs to know about one upload; every field has a "just works" default."""

    format: DatasetFormat = "auto"
    container: ContainerFormat = "auto"
    encoding: str | None = None  # None: UTF-8, else detected (and reported) or refused naming the encoding
    columns: ColumnMapping | None = None
    transcript: TranscriptOptions | None = None
    paired: PairedOptions | None = None
    field_map: dict[str, str] = Field(default_factory=dict)  # rename source fields first: {"pergunta": "prompt"}
    system_prompt: str | None = None  # injected into examples that have no system message
    encryption: EncryptionOptions | None = None
    csv_delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    mode: Literal["strict", "lenient"] = "lenient"  # strict: any row error fails the file
    repairs: bool = True  # mojibake, BOM, CRLF, control chars, NFC, whitespace (each counted per row)
    deduplicate: Literal["none", "exact", "normalized"] = "normalized"
    base_model: str | None = None  # whose tokenizer measures lengths; None = the catalog's default model
    max_seq_len: int = Field(default=2048, ge=16, le=1_048_576)
    length_policy: Literal["drop", "truncate", "fail"] = "drop"
    split: SplitOptions = Field(default_factory=SplitOptions)
    min_examples: int = Field(default=10, ge=1)
    preview_count: int = Field(default=5, ge=0, le=100)
    encrypt_at_rest: bool = False  # normalized splits encrypted with AFINA_DATA_ENCRYPTION_KEY

    @model_validator(mode="after")
    def _format_needs_its_section(self) -> IngestOptions:
        spec = RECORD_FORMATS_BY_NAME.get(self.format)
        if spec is not None and spec.section_required and getattr(self, spec.options_section or "") is None:
            raise ValueError(f"format {spec.name!r} needs a {spec.options_section!r} section ({spec.summary})")
        return self


IngestOptionsInput = Annotated[IngestOptions, Field(default_factory=IngestOptions)]
