"""The throughput plan (``speed: auto``): the fastest way to run a job's effective batch in the memory the GPU has.

Users guess micro-batches and checkpointing until memory runs out (seed 002_*: "max batch
4"); the preflight already knows what a setting costs in memory, so the plan uses it to go
fast instead of only to refuse. Measured on an H200 (issue 15, Llama-3.2-1B shape, Unsloth,
sequence 2048): Unsloth's defaults (micro-batch 4, offloaded checkpointing) 55.0k tokens/s
at 3.65 GiB; no checkpointing, micro-batch 4: 75.7k at 10.9 GiB; 8: 78.2k; 16: 80.0k at
36.0 GiB. Two things decide the speed, and the plan scores candidates with both:

- **recomputation**: checkpointing a layer runs its forward twice (4/3 of the compute);
  Unsloth's offloaded variant measured 1.376× slower than none at the same micro-batch;
  selective checkpointing of ``k`` of ``L`` layers costs ``1 + k/(3L)``;
- **tokens per micro-batch**: a GPU kernel's efficiency saturates with size, fitted on the
  figures above as ``t / (t + 636)`` for ``t`` tokens (predicts 0.981 for 8 vs 16 rows,
  measured 0.978).

The plan keeps the effective batch (``batch_size × gradient_accumulation_steps``) and
splits it into micro-batches that divide it; ``gradient_accumulation_steps`` or
``gradient_checkpointing`` set explicitly in the request are kept, and where the plan
would have chosen otherwise the job's events say so. ``fallback()`` is the next-best
candidate that needs less memory: what the recipe backs off to, once, on out-of-memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from afina.core.errors import InsufficientMemory
from afina.trainer.preflight import GIB, MemoryEstimate, ModelShape, RunShape, estimate_memory, suggest_fit

Checkpointing = Literal["none", "selective", "full", "offloaded"]
SATURATION_TOKENS = 636  # tokens at which a micro-batch reaches half its asymptotic speed (fitted, see above)
RECOMPUTE_COST: dict[str, float] = {"none": 1.0, "full": 4 / 3, "offloaded": 75.7 / 55.0}


@dataclass(frozen=True)
class Fixed:
    """What the request set explicitly: the plan never changes these."""

    accumulation: int | None = None  # gradient_accumulation_steps set: the split is the user's
    checkpointing: Checkpointing | None = None
    checkpoint_layers: int | None = None


@dataclass(frozen=True)
class Candidate:
    micro_batch: int
    accumulation: int
    checkpointing: Checkpointing
    checkpoint_layers: int  # layers that checkpoint: 0 for none, all of them for full/offloaded

    def run_shape(self, base: RunShape) -> RunShape:
        return replace(base, batch_size=self.micro_batch, gradient_accumulation_steps=self.accumulation,
                       gradient_checkpointing=self.checkpointing != "none",
                       checkpoint_layers=self.checkpoint_layers if self.checkpointing == "selective" else None)

    def describe(self, num_layers: int) -> str:
        how = {"none": "no activation checkpointing", "full": "activation checkpointing on every layer",
               "offloaded": "Unsloth's offloaded activation checkpointing",
               "selective": f"activation checkpointing on {self.checkpoint_layers} of {num_layers} layers"}
        return f"micro-batch {self.micro_batch} × {self.accumulation} accumulation, {how[self.checkpointing]}"


@dataclass(frozen=True)
class ThroughputPlan:
    """The chosen candidate, its estimate against the budget, and what the events should say about it."""

    chosen: Candidate
    estimate: MemoryEstimate
    budget: float
    num_layers: int
    notes: tuple[str, ...] = ()
    alternatives: tuple[tuple[Candidate, MemoryEstimate], ...] = ()  # fitting, slower, less memory: the back-offs

    def describe(self) -> str:
        return (f"{self.chosen.describe(self.num_layers)}: about {self.estimate.total / GIB:.1f} GiB of the "
                f"{self.budget / GIB:.1f} GiB free")

    def fallback(self) -> ThroughputPlan | None:
        """The fastest fitting candidate that needs clearly less memory than the chosen one (the OOM back-off)."""
        ceiling = self.estimate.total * 0.8  # the estimate was wrong by at least the margin: step well below it
        for candidate, estimate in self.alternatives:
            if estimate.total <= ceiling:
                return ThroughputPlan(chosen=candidate, estimate=estimate, budget=self.budget,
                                      num_layers=self.num_layers,
                                      notes=(f"backed off from {self.chosen.describe(self.num_layers)}",))
        return None


def speed_score(candidate: Candidate, tokens_per_row: float, num_layers: int) -> float:
    """Relative tokens/s of ``candidate`` (higher is faster); only comparisons between candidates mean anything."""
    tokens = candidate.micro_batch * tokens_per_row
    efficiency = tokens / (tokens + SATURATION_TOKENS)
    if candidate.checkpointing == "selective":
        recompute = 1 + candidate.checkpoint_layers / (3 * num_layers)
    else:
        recompute = RECOMPUTE_COST[candidate.checkpointing]
    return efficiency / recompute


def candidates(effective_batch: int, backend: str, num_layers: int, fixed: Fixed, *,
               fixed_micro_batch: int | None) -> list[Candidate]:
    """Every split and checkpointing the plan may pick, fastest-first ordering left to the caller."""
    if fixed_micro_batch is not None:
        micro_batches = [fixed_micro_batch]
    else:
        micro_batches = [m for m in range(effective_batch, 0, -1) if effective_batch % m == 0]
    if fixed.checkpointing is not None:
        modes: list[Checkpointing] = [fixed.checkpointing]
    elif backend == "unsloth":
        modes = ["none", "offloaded"]  # Unsloth's own checkpointing is all layers, offloaded
    else:
        modes = ["none", "selective", "full"]
    found = []
    for micro in micro_batches:
        accumulation = effective_batch // micro
        for mode in modes:
            if mode == "selective":
                layers = [fixed.checkpoint_layers] if fixed.checkpoint_layers else range(1, num_layers)
                found += [Candidate(micro, accumulation, "selective", k) for k in layers]
            else:
                found.append(Candidate(micro, accumulation, mode, 0 if mode == "none" else num_layers))
    return found


def plan_throughput(model: ModelShape, run: RunShape, *, budget: float, fixed: Fixed,
                    mean_tokens_per_row: float | None = None) -> ThroughputPlan:
    """The fastest candidate whose estimate fits ``budget`` bytes; ``InsufficientMemory``
    with the smallest change that would fit when none does.

    ``run`` carries the resolved config (its micro-batch × accumulation is the effective batch kept) and
    the longest row (memory is sized for the worst micro-batch); ``mean_tokens_per_row`` (default: the
    longest) sizes the speed score, since an unpacked micro-batch is padded only to its own longest row.
    """
    effective = run.batch_size * run.gradient_accumulation_steps
    fixed_micro = None
    if fixed.accumulation is not None:
        fixed_micro = max(1, effective // fixed.accumulation)
    tokens = mean_tokens_per_row or run.tokens_per_row
    pool = candidates(effective, run.backend, model.num_layers, fixed, fixed_micro_batch=fixed_micro)
    scored = sorted(pool, key=lambda c: (-speed_score(c, tokens, model.num_layers), -c.checkpoint_layers))
    fitting = [(c, estimate_memory(model, c.run_shape(run))) for c in scored]
    fitting = [(c, e) for c, e in fitting if e.total <= budget]
    if not fitting:
        smallest = min(pool, key=lambda c: estimate_memory(model, c.run_shape(run)).total)
        needed = estimate_memory(model, smallest.run_shape(run))
        advice = suggest_fit(model, smallest.run_shape(run), budget)
        fix = f"; {advice}" if advice else "; no smaller setting fits: use a smaller model or a larger GPU"
        raise InsufficientMemory(f"no way to run this job fits the GPU: even {smallest.describe(model.num_layers)} "
                                 f"needs about {needed.total / GIB:.1f} GiB ({needed.describe()}) and the GPU has "
                                 f"{budget / GIB:.1f} GiB free{fix}", needed_bytes=needed.total, available_bytes=budget)
    chosen, estimate = fitting[0]
    slower = tuple((c, e) for c, e in fitting[1:] if e.total < estimate.total)
    slower = tuple(sorted(slower, key=lambda pair: -speed_score(pair[0], tokens, model.num_layers)))
    notes = _explicit_notes(model, run, budget, fixed, chosen, tokens)
    return ThroughputPlan(chosen=chosen, estimate=estimate, budget=budget, num_layers=model.num_layers,
                          notes=notes, alternatives=slower)


def _explicit_notes(model: ModelShape, run: RunShape, budget: float, fixed: Fixed, chosen: Candidate,
                    tokens: float) -> tuple[str, ...]:
    """Where an explicit setting kept the plan from a faster choice: said, never silently overridden."""
    if fixed.accumulation is None and fixed.checkpointing is None:
        return ()
    free = plan_throughput(model, run, budget=budget, fixed=Fixed(), mean_tokens_per_row=tokens).chosen
    gain = speed_score(free, tokens, model.num_layers) / speed_score(chosen, tokens, model.num_layers)
    if free == chosen or gain < 1.01:
        return ()
    kept = [name for name, value in (("gradient_accumulation_steps", fixed.accumulation),
                                     ("gradient_checkpointing", fixed.checkpointing),
                                     ("checkpoint_layers", fixed.checkpoint_layers)) if value is not None]
    return (f"{' and '.join(kept)} set explicitly: kept, though {free.describe(model.num_layers)} fits this GPU "
            f"and would train about {gain:.2f}× faster",)
