"""One labelled series of a Prometheus metric, looked up once and then kept.

``metric.labels(...)`` checks its arguments, takes a lock and looks the series up on every call; the
gateway made about ten such calls for each proxied request. The series it names never change (nothing
removes or clears them), and every label value the gateway passes is already bounded (route templates,
methods, statuses, ``bounded_label``), so keeping them by their values costs a bounded dict and saves
that work.
"""

from __future__ import annotations

from typing import Any

_series: dict[tuple[int, tuple[str, ...]], Any] = {}


def series(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)`` (values in the order of the metric's label names), kept after the first call."""
    key = (id(metric), values)
    found = _series.get(key)
    if found is None:
        found = _series[key] = metric.labels(*values)
    return found
