"""The report's charts as PNG bytes: loss, learning rate and memory over the run.

matplotlib is imported inside the drawing functions, on its Agg backend (no display, no
GUI toolkit), so importing this module costs nothing and a worker that never draws never
loads it. Each function returns None when there is nothing to draw, so a run without
validation or without a GPU simply has fewer lines or charts, never an empty picture.
"""

from __future__ import annotations

from typing import Any

from afina.core import reports

WIDTH_IN, HEIGHT_IN, DPI = 9.0, 4.8, 110
TRAIN_COLOR, AVERAGE_COLOR, VALID_COLOR = "#1f77b4", "#0b3d91", "#d62728"


def _mark_resumes(axes: Any, resumed_at: list[int]) -> None:
    for index, step in enumerate(resumed_at):
        axes.axvline(step, color="#7f7f7f", linestyle="--", linewidth=1,
                     label="resumed from checkpoint" if index == 0 else None)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start), one per input value."""
    averages, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averages.append(total / min(index + 1, window))
    return averages


def loss_chart(records: list[dict[str, Any]], resumed_at: list[int] | None = None) -> bytes | None:
    """Training loss (and its moving average) and validation loss over optimizer steps."""
    train = [(r["step"], r["train_loss"]) for r in records
             if r["type"] == "train" and r.get("train_loss") is not None]
    valid = [(r["step"], r["full_valid_loss"]) for r in records
             if r["type"] == "validation" and r.get("full_valid_loss") is not None]
    if not train and not valid:
        return None
    plt = reports.pyplot()
    figure, axes = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    if train:
        steps, losses = zip(*train, strict=True)
        axes.plot(steps, losses, color=TRAIN_COLOR, alpha=0.45 if len(train) > 20 else 1.0, linewidth=1.2,
                  marker="o" if len(train) <= 30 else None, markersize=3, label="training loss")
        if len(train) > 20:
            window = max(5, len(train) // 20)
            axes.plot(steps, moving_average(list(losses), window), color=AVERAGE_COLOR, linewidth=2,
                      label=f"training loss, moving average ({window} logs)")
    if valid:
        steps, losses = zip(*valid, strict=True)
        axes.plot(steps, losses, color=VALID_COLOR, marker="s", markersize=5, linewidth=1.8,
                  label="validation loss (full split)")
    _mark_resumes(axes, resumed_at or [])
    axes.set_title("Loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return reports.png(figure, DPI)


def learning_rate_chart(records: list[dict[str, Any]], resumed_at: list[int] | None = None) -> bytes | None:
    """The scheduler's learning rate at each logged step."""
    points = [(r["step"], r["learning_rate"]) for r in records
              if r["type"] == "train" and r.get("learning_rate") is not None]
    if not points:
        return None
    plt = reports.pyplot()
    figure, axes = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN * 0.75))
    steps, rates = zip(*points, strict=True)
    axes.plot(steps, rates, color="#2ca02c", linewidth=1.8, marker="o" if len(points) <= 30 else None, markersize=3,
              label="learning rate")
    _mark_resumes(axes, resumed_at or [])
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.set_title("Learning rate")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return reports.png(figure, DPI)


def gpu_indices(samples: list[dict[str, Any]]) -> list[int]:
    """The GPU indices that appear in the hardware samples (``gpu<i>_allocated_gb`` keys)."""
    found = {int(key[3:-len("_allocated_gb")]) for sample in samples for key in sample
             if key.startswith("gpu") and key.endswith("_allocated_gb") and key[3:-len("_allocated_gb")].isdigit()}
    return sorted(found)


def memory_chart(samples: list[dict[str, Any]]) -> bytes | None:
    """RAM (the machine's used, the training process's resident) and, per GPU, the allocator's
    allocated and reserved memory, over the run's wall-clock time in minutes."""
    samples = sorted((s for s in samples if s.get("timestamp") is not None), key=lambda s: s["timestamp"])
    if len(samples) < 2:
        return None
    plt = reports.pyplot()
    figure, axes = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    start = samples[0]["timestamp"]
    minutes = [(s["timestamp"] - start) / 60 for s in samples]

    def series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(m, s[key]) for m, s in zip(minutes, samples, strict=True) if s.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    for key, label, color in (("ram_used_gb", "RAM used (machine)", "#1f77b4"),
                              ("process_rss_gb", "RAM of the training process", "#17becf")):
        x, y = series(key)
        if x:
            axes.plot(x, y, color=color, linewidth=1.6, label=label)
    gpu_colors = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#2ca02c")
    for number, index in enumerate(gpu_indices(samples)):
        color = gpu_colors[number % len(gpu_colors)]
        x, y = series(f"gpu{index}_allocated_gb")
        axes.plot(x, y, color=color, linewidth=1.6, label=f"GPU {index} allocated")
        x, y = series(f"gpu{index}_reserved_gb")
        if x:
            axes.plot(x, y, color=color, linewidth=1.0, linestyle=":", label=f"GPU {index} reserved")
    attempts = [(m, s.get("attempt")) for m, s in zip(minutes, samples, strict=True)]
    for (_, before), (moment, after) in zip(attempts, attempts[1:], strict=False):
        if after != before:
            axes.axvline(moment, color="#7f7f7f", linestyle="--", linewidth=1, label=f"attempt {after} starts")
    axes.set_title("Memory over time")
    axes.set_xlabel("minutes since the first sample")
    axes.set_ylabel("GiB")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return reports.png(figure, DPI)
