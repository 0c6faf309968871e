"""``TrainingSpec``: every knob of a LoRA SFT run, as a user writes it (API ``hyperparameters``, YAML config).

One schema for every way in: the API's ``hyperparameters`` and OpenAI's
``method.supervised.hyperparameters``, the CLI's ``afina train --config job.yaml``, and the
JSON schema in ``configs/schema/``. Values are checked here, before a job exists; what
``"auto"`` and a missing value become is decided later, when the dataset size is known
(``afina.core.training.resolve``).

Unknown keys are refused (a misspelt ``lora_rank`` must not silently train with the default),
and so is ``learning_rate``, which is derived (``2e-4 × learning_rate_multiplier``). Every
error is an ``InvalidRequest`` whose ``param`` is ``hyperparameters.<name>``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from afina.core.catalog.registry import FAMILIES
from afina.core.errors import InvalidRequest
from afina.core.queue.names import GPU_CLASS_NAME, is_gpu_class_name

AUTO = "auto"
BASE_LEARNING_RATE = 2e-4
DEFAULT_PREFIX = "hyperparameters"

Quantization = Literal["none", "4bit", "8bit"]
Backend = Literal["auto", "hf", "unsloth"]
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt"]
# transformers' OptimizerNames; the 8-bit and paged ones need bitsandbytes and a CUDA device
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                    "adafactor", "sgd", "lion_8bit", "paged_lion_8bit"]
CUDA_ONLY_OPTIMIZERS = frozenset({"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit",
                                  "paged_lion_8bit"})
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _integer(value: Any) -> int:
    """An int, or a float with an integral value (JSON has one number type); never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return float(value)


def _auto_or(kind: type, low: float, high: float, *, low_exclusive: bool = False) -> Any:
    """``"auto"`` or a number in [low, high] ((low, high] with ``low_exclusive``); integers only for ``int``."""
    noun = "an integer" if kind is int else "a number"
    bounds = f"greater than {low:g}" if low_exclusive else f"at least {low:g}"

    def validate(value: Any) -> Any:
        if value == AUTO:
            return AUTO
        try:
            number: float = _integer(value) if kind is int else _number(value)
        except ValueError:
            raise ValueError(f"must be 'auto' or {noun}, got {value!r}") from None
        if (number <= low if low_exclusive else number < low) or number > high:
            raise ValueError(f"must be 'auto' or {noun} {bounds} and at most {high:g}, got {value!r}")
        return number

    limit = {"exclusiveMinimum": low} if low_exclusive else {"minimum": low}
    schema = {"anyOf": [{"const": AUTO}, {"type": "integer" if kind is int else "number", **limit, "maximum": high}],
              "default": AUTO}
    return Annotated[Literal["auto"] | kind, PlainValidator(validate), WithJsonSchema(schema)]


# the bounds come before the strict-type validator so the JSON schema shows them as minimum/maximum
def _int_field(low: int, high: int | None = None) -> Any:
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integer)]


def _float_field(**bounds: float) -> Any:
    return Annotated[float, Field(**bounds), BeforeValidator(_number)]


def _target_modules(value: Any) -> list[str] | str:
    if value == "all-linear":
        return value
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be 'all-linear' or a non-empty list of module names, e.g. [q_proj, v_proj]")
    for name in value:
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a module name (letters, digits, '_' and '.')")
    if len(set(value)) != len(value):
        raise ValueError("lists a module twice")
    return list(value)


def _gradient_checkpointing(value: Any) -> bool | str:
    if isinstance(value, bool) or value in (AUTO, "unsloth"):
        return value
    raise ValueError(f"must be 'auto', true, false or 'unsloth', got {value!r}")


def _early_stopping(value: Any) -> Any:
    """``true`` turns early stopping on with the defaults; ``false`` (like null) leaves it off."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


# the field types, named so the model below reads as a table
AutoEpochs = _auto_or(int, 1, 50)
AutoBatchSize = _auto_or(int, 1, 256)
AutoMultiplier = _auto_or(float, 0, 100, low_exclusive=True)
PositiveInt = _int_field(1)
NonNegativeInt = _int_field(0)
LoraRank = _int_field(1, 1024)
LoraAlpha = _int_field(1, 4096)
SequenceLength = _int_field(16, 131_072)
AccumulationSteps = _int_field(1, 1024)
Seed = _int_field(0, 2**31 - 1)
Fraction = _float_field(ge=0, lt=1)  # [0, 1)
UnitInterval = _float_field(ge=0, le=1)
NonNegativeFloat = _float_field(ge=0)
StrictBool = Annotated[bool, Strict()]
GpuCount = _int_field(1, 8)
GpuClassName = Annotated[str, Field(pattern=f"^{GPU_CLASS_NAME}$")]
TargetModules = Annotated[
    list[str] | Literal["all-linear"] | None,
    PlainValidator(lambda value: None if value is None else _target_modules(value)),
    WithJsonSchema({"anyOf": [
        {"const": "all-linear"},
        {"type": "array", "minItems": 1, "uniqueItems": True,
         "items": {"type": "string", "pattern": f"^{_MODULE_NAME.pattern}$"}},
        {"type": "null"}], "default": None}),
]
GradientCheckpointing = Annotated[
    bool | Literal["auto", "unsloth"], PlainValidator(_gradient_checkpointing),
    WithJsonSchema({"enum": [AUTO, True, False, "unsloth"], "default": AUTO}),
]


class EarlyStopping(BaseModel):
    """Stop when the validation loss has not improved by more than ``threshold`` for ``patience`` evaluations."""

    model_config = ConfigDict(extra="forbid")

    patience: Annotated[int, Field(ge=1, le=1000), BeforeValidator(_integer)] = Field(
        3, description="evaluations without improvement before training stops")
    threshold: Annotated[float, Field(ge=0), BeforeValidator(_number)] = Field(
        0.0, description="how much lower the validation loss must be to count as an improvement")


class TrainingSpec(BaseModel):
    """The hyperparameters of a supervised LoRA fine-tuning job. Every field may be left out."""

    model_config = ConfigDict(extra="forbid", title="afina training hyperparameters")

    # OpenAI's three ("auto" resolves by the rules in afina.core.training.resolve)
    n_epochs: AutoEpochs = Field(
        AUTO, description="passes over the training set; auto: 3, clamped so examples x epochs is in [100, 25000]")
    batch_size: AutoBatchSize = Field(
        AUTO, description="examples per micro-batch; auto: min(8, n // 16) rounded down to a power of two")
    learning_rate_multiplier: AutoMultiplier = Field(
        AUTO, description=f"learning rate = {BASE_LEARNING_RATE:g} x this; auto: 1.0")

    # LoRA
    lora_r: LoraRank = Field(16, description="LoRA rank")
    lora_alpha: LoraAlpha = Field(32, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: Fraction = Field(0.05, description="dropout on the LoRA input")
    target_modules: TargetModules = Field(
        None, description="modules LoRA adapts; null: the model family's (every attention and MLP projection)")
    quantization: Quantization = Field("none", description="base weights in 4-bit (QLoRA) or 8-bit; CUDA only")

    # data
    max_seq_len: SequenceLength = Field(
        1024, description="tokens per example; longer ones are truncated; at most the model's context length")
    packing: StrictBool = Field(False, description="pack several short examples into one sequence")
    assistant_only_loss: StrictBool = Field(
        True, description="train on the assistant replies only (the prompt tokens are masked out)")

    # schedule
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps (wins over n_epochs)")
    gradient_accumulation_steps: AccumulationSteps = Field(
        1, description="micro-batches per optimizer step (effective batch = batch_size x this)")
    warmup_ratio: Fraction = Field(0.03, description="fraction of the steps spent warming up")
    warmup_steps: NonNegativeInt | None = Field(None, description="warm-up steps; when set, wins over warmup_ratio")
    lr_scheduler: LrScheduler = Field("linear", description="learning-rate schedule after warm-up")
    optimizer: Optimizer = Field("adamw_torch", description="the 8-bit and paged optimizers need CUDA")
    weight_decay: UnitInterval = Field(0.0, description="decoupled weight decay")
    max_grad_norm: NonNegativeFloat = Field(1.0, description="gradient clipping norm; 0 turns clipping off")
    seed: Seed | None = Field(None, description="the run's seed (the job's top-level seed, when that is not given)")

    # evaluation, checkpoints, logging
    eval_steps: PositiveInt | None = Field(None, description="steps between evaluations; null: once an epoch")
    save_steps: PositiveInt | None = Field(
        None, description="steps between checkpoints; null: about four a run, at least one every 50 steps")
    logging_steps: PositiveInt = Field(1, description="steps between metric events")
    early_stopping: Annotated[EarlyStopping | None, BeforeValidator(_early_stopping)] = Field(
        None, description="stop when the validation loss stops improving (true: the defaults); needs validation data",
        json_schema_extra=lambda schema: schema["anyOf"].insert(1, {"type": "boolean"}))

    # execution
    gradient_checkpointing: GradientCheckpointing = Field(
        AUTO, description="auto: on for CUDA, off for CPU; unsloth: Unsloth's offloaded checkpointing")
    backend: Backend = Field(AUTO, description="auto: unsloth when CUDA and the package are there, else hf")
    speed: Literal["auto", "off"] = Field(
        AUTO, description="auto: on a GPU, choose the micro-batch split of the effective batch and the activation "
                          "checkpointing from the memory this GPU has, back off once on out-of-memory, and use "
                          "fused kernels where they apply; explicit settings always win. off: run as configured")
    checkpoint_layers: PositiveInt | None = Field(
        None, description="with gradient_checkpointing on (hf backend): how many decoder layers checkpoint their "
                          "activations, the rest keep them (selective checkpointing); null: every layer")
    num_gpus: GpuCount = Field(
        1, description="GPUs that train this job together (data parallel, one process per GPU); more than 1 sends "
                       "the job to the workers that own that many GPUs of its class")
    gpu_class: GpuClassName | None = Field(
        None, description="the GPU class (a name the operator declares in AFINA_GPU_CLASSES, e.g. 'a100-80gb') "
                          "whose workers train this job; null: the default class, or the smallest larger class "
                          "when the preflight finds that the job does not fit the GPU it landed on")
    oom_retry: StrictBool = Field(
        False, description="after a CUDA out-of-memory error, retry once with half the micro-batch and twice "
                           "the accumulation (same effective batch)")
    chat_family: str | None = Field(
        None, description="the model's chat family, for a model the catalog cannot identify",
        json_schema_extra={"anyOf": [{"enum": sorted(FAMILIES)}, {"type": "null"}]})

    @model_validator(mode="before")
    @classmethod
    def _derived_names(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "learning_rate" in data:
            raise PydanticCustomError(
                "afina_field", "learning_rate is derived: set learning_rate_multiplier instead "
                f"(learning_rate = {BASE_LEARNING_RATE:g} x learning_rate_multiplier)", {"field": "learning_rate"})
        return data

    @field_validator("gpu_class")
    @classmethod
    def _class_name(cls, value: str | None) -> str | None:
        if value is not None and not is_gpu_class_name(value):
            raise ValueError(f"{value!r} is not a GPU class name: lower-case letters, digits and '-', "
                             f"not 'x<N>' (which names a GPU count)")
        return value

    @field_validator("chat_family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        if value is not None and value not in FAMILIES:
            raise ValueError(f"unknown chat family {value!r}; choose one of {sorted(FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.gradient_checkpointing == "unsloth" and self.backend == "hf":
            raise PydanticCustomError("afina_field", "'unsloth' gradient checkpointing needs the unsloth backend: "
                                      "set backend to auto or unsloth, or gradient_checkpointing to true",
                                      {"field": "gradient_checkpointing"})
        if self.checkpoint_layers is not None and (self.backend == "unsloth" or self.gradient_checkpointing is False
                                                   or self.gradient_checkpointing == "unsloth"):
            raise PydanticCustomError("afina_field", "checkpoint_layers selects the layers that checkpoint their "
                                      "activations with the hf backend: it needs gradient_checkpointing true or auto "
                                      "and backend hf or auto", {"field": "checkpoint_layers"})
        return self

    def requested(self) -> dict[str, Any]:
        """What the user set, normalized (``3.0`` → ``3``), JSON-ready: what a job stores as asked for."""
        return self.model_dump(mode="json", exclude_unset=True)


def parse_training_spec(values: Mapping[str, Any] | None, prefix: str = DEFAULT_PREFIX) -> TrainingSpec:
    """``values`` validated; an ``InvalidRequest`` whose ``param`` is ``<prefix>.<field>`` otherwise."""
    if values is not None and not isinstance(values, Mapping):
        raise InvalidRequest(f"{prefix} must be an object of hyperparameters, got {type(values).__name__}",
                             param=prefix)
    try:
        return TrainingSpec.model_validate(dict(values or {}))
    except ValidationError as exc:
        raise invalid_request(exc, prefix) from None


def invalid_request(error: ValidationError, prefix: str = DEFAULT_PREFIX) -> InvalidRequest:
    """The first problem of a ``TrainingSpec`` validation as an ``InvalidRequest`` naming its field.

    Messages say what is accepted; an unknown name gets the closest accepted one suggested.
    """
    problems = error.errors()
    first = problems[0]
    location = [str(part) for part in first.get("loc", ())]
    context = first.get("ctx") or {}
    if "field" in context:
        location = [str(context["field"])]
    field = ".".join(location)
    param = f"{prefix}.{field}" if field else prefix
    if first["type"] == "extra_forbidden":
        accepted = sorted(TrainingSpec.model_fields) if len(location) == 1 else sorted(EarlyStopping.model_fields)
        close = difflib.get_close_matches(location[-1], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        message = f"unknown hyperparameter {param!r}{hint}; accepted: {accepted}"
    else:
        reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        given = repr(first.get("input"))
        shown = "" if "got" in reason or given in reason or first["type"] == "afina_field" else f" (got {given})"
        message = f"invalid {param}: {reason}{shown}"
    if len(problems) > 1:
        message += f" ({len(problems) - 1} more problem(s) in {prefix})"
    return InvalidRequest(message, param=param)
