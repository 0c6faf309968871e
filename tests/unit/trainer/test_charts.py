"""The report's charts: real PNGs (decoded with Pillow) whose pixels show the lines that should be there."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest

from afina.trainer import charts


def image(png: bytes) -> Any:
    from PIL import Image

    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG"
    picture.load()  # decodes every byte: a truncated or corrupt file raises here
    return picture.convert("RGB")


def pixels_of(picture: Any, hex_color: str, tolerance: int = 12) -> int:
    """How many pixels are (nearly) ``hex_color``: a drawn line's core has its exact color."""
    target = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    histogram = picture.getcolors(maxcolors=1 << 20)
    return sum(count for count, rgb in histogram
               if all(abs(a - b) <= tolerance for a, b in zip(rgb, target, strict=True)))


def train_records(steps: int, *, start: int = 1) -> list[dict[str, Any]]:
    return [{"type": "train", "step": step, "epoch": step / 10, "train_loss": 2.2 * math.exp(-step / 8) + 0.7,
             "learning_rate": 2e-4 * min(1.0, step / 3) * (1 - step / (steps + 1))}
            for step in range(start, steps + 1)]


def validation_records(*steps: int) -> list[dict[str, Any]]:
    return [{"type": "validation", "step": step, "epoch": step / 10, "full_valid_loss": 2.4 * math.exp(-step / 9) + 0.8}
            for step in steps]


def test_moving_average_is_trailing() -> None:
    assert charts.moving_average([4.0, 2.0, 6.0, 8.0], 2) == [4.0, 3.0, 4.0, 7.0]
    assert charts.moving_average([], 5) == []
    assert charts.moving_average([1.0, 2.0, 3.0], 10) == [1.0, 1.5, 2.0]


def test_loss_chart_draws_training_and_validation() -> None:
    picture = image(charts.loss_chart(train_records(12) + validation_records(4, 8, 12)))
    assert picture.size == (round(charts.WIDTH_IN * charts.DPI), round(charts.HEIGHT_IN * charts.DPI))
    assert pixels_of(picture, charts.TRAIN_COLOR) > 300
    assert pixels_of(picture, charts.VALID_COLOR) > 300
    assert len(picture.getcolors(maxcolors=1 << 20)) > 50  # axes, text, lines: not a blank canvas


def test_loss_chart_without_validation_has_no_validation_line() -> None:
    picture = image(charts.loss_chart(train_records(12)))
    assert pixels_of(picture, charts.TRAIN_COLOR) > 300
    assert pixels_of(picture, charts.VALID_COLOR) == 0


def test_a_long_run_gets_a_moving_average_and_resume_marks() -> None:
    picture = image(charts.loss_chart(train_records(300), resumed_at=[120]))
    assert pixels_of(picture, charts.AVERAGE_COLOR) > 300
    assert pixels_of(picture, "#7f7f7f") > 100  # the dashed resume line


def test_learning_rate_chart() -> None:
    picture = image(charts.learning_rate_chart(train_records(20)))
    assert pixels_of(picture, "#2ca02c") > 300
    assert charts.learning_rate_chart(validation_records(4)) is None


def hardware(samples: int, gpus: int = 0) -> list[dict[str, Any]]:
    records = []
    for index in range(samples):
        record: dict[str, Any] = {"timestamp": 1_790_000_000.0 + 10 * index, "attempt": 1, "step": index * 10,
                                  "ram_used_gb": 11.0 + 0.05 * index, "process_rss_gb": 2.1 + 0.02 * index}
        for gpu in range(gpus):
            record[f"gpu{gpu}_allocated_gb"] = 3.2 + 0.1 * math.sin(index) + gpu
            record[f"gpu{gpu}_reserved_gb"] = 4.5 + gpu
            record[f"gpu{gpu}_peak_gb"] = 3.7 + gpu
        records.append(record)
    return records


def test_memory_chart_with_and_without_gpus() -> None:
    with_gpu = image(charts.memory_chart(hardware(30, gpus=2)))
    assert pixels_of(with_gpu, "#1f77b4") > 300  # machine RAM
    assert pixels_of(with_gpu, "#d62728") > 300 and pixels_of(with_gpu, "#ff7f0e") > 300  # GPU 0 and GPU 1
    cpu_only = image(charts.memory_chart(hardware(30)))
    assert pixels_of(cpu_only, "#17becf") > 300  # the process's RAM
    assert pixels_of(cpu_only, "#d62728") == 0
    assert charts.gpu_indices(hardware(2, gpus=2)) == [0, 1] and charts.gpu_indices(hardware(2)) == []


@pytest.mark.parametrize("draw, data", [
    (charts.loss_chart, []),
    (charts.learning_rate_chart, []),
    (charts.memory_chart, hardware(1)),
])
def test_nothing_to_draw_gives_no_chart(draw: Any, data: list[dict[str, Any]]) -> None:
    assert draw(data) is None
