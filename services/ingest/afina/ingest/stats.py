"""What an ingest run saw, in numbers a person can check before paying for training.

Counts per stage, issues by action and rule (duplicates included), examples per split, token
length statistics (an exact histogram, bucketed by powers of two for JSON and drawn as a PNG),
role statistics and the languages of the data. Everything is accumulated in O(distinct values)
memory, so a 1M-row file costs the same as a 100-row one.

Languages come from ``py3langid`` (a bundled n-gram model, offline, 97 languages), on a sample:
the first ``LANGUAGE_SAMPLE_HEAD`` examples and then one in ``language_sample_every``, because
one call costs ~100 µs — more than everything else here together.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from afina.ingest.records import Example, RowIssue
from afina.ingest.tokens import TokenResult

LANGUAGE_SAMPLE_HEAD = 1_000
LANGUAGE_TEXT_CHARS = 400  # enough for a confident guess, bounded cost
LANGUAGE_MIN_CHARS = 12  # shorter text ("oi", "ok") is reported as "und"
DUPLICATE_RULES = ("duplicate_exact", "duplicate_normalized")


@lru_cache(maxsize=1)
def _language_identifier() -> Any:
    # ~2 s to load the model: only when the first example is sampled
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)


def detect_language(text: str) -> str:
    """ISO 639-1 code of ``text``'s language, ``"und"`` when there is too little text to tell."""
    sample = text[:LANGUAGE_TEXT_CHARS].strip().lower()  # lowercase: ALL-CAPS prompts confuse the n-grams
    if len(sample) < LANGUAGE_MIN_CHARS:
        return "und"
    return str(_language_identifier().classify(sample)[0])


class StatsCollector:
    """Accumulates an ingest run's statistics; ``as_dict()`` is the JSON the report and API show."""

    def __init__(self, max_seq_len: int | None = None, language_sample_every: int = 50) -> None:
        self.max_seq_len = max_seq_len
        self.language_sample_every = max(1, language_sample_every)
        self.stages: Counter[str] = Counter()
        self.issues: dict[str, Counter[str]] = {}
        self.rows_with_fixes = 0
        self.splits: Counter[str] = Counter()
        self.examples = 0
        self.chat_examples = 0
        self.with_system = 0
        self.messages_per_role: Counter[str] = Counter()
        self.chars_per_role: Counter[str] = Counter()
        self.turns: Counter[int] = Counter()  # non-system messages per chat example
        self.token_lengths: Counter[int] = Counter()
        self.trained_lengths: Counter[int] = Counter()
        self.uncounted = 0  # kept examples not tokenized (they provably fit; see LengthChecker.count_every)
        self.truncated = 0
        self.languages: Counter[str] = Counter()

    def count(self, stage: str, n: int = 1) -> None:
        """Add ``n`` to a stage's counter: ``read``, ``converted``, ``repaired``, ``written``, ..."""
        self.stages[stage] += n

    def add_issues(self, issues: Iterable[RowIssue]) -> None:
        """Count one row's issues by action and rule (call once per row: it also counts rows with fixes)."""
        fixed = False
        for issue in issues:
            self.issues.setdefault(issue.action, Counter())[issue.rule] += 1
            fixed = fixed or issue.action == "fixed"
        self.rows_with_fixes += fixed

    def add_example(self, example: Example, split: str, tokens: TokenResult | None = None) -> None:
        """Account for an example that goes into ``split`` (only kept examples are added)."""
        self.examples += 1
        self.splits[split] += 1
        if example.messages is not None:
            self.chat_examples += 1
            turns = 0
            for message in example.messages:
                role = str(message.get("role"))
                self.messages_per_role[role] += 1
                content = message.get("content")
                self.chars_per_role[role] += len(content) if isinstance(content, str) else 0
                turns += role != "system"
            self.with_system += bool(example.messages) and example.messages[0].get("role") == "system"
            self.turns[turns] += 1
        if tokens is not None:
            if tokens.tokens is None:
                self.uncounted += 1
            else:
                self.token_lengths[tokens.tokens] += 1
                self.trained_lengths[tokens.trained_tokens or 0] += 1
            self.truncated += tokens.truncated
        if self.examples <= LANGUAGE_SAMPLE_HEAD or self.examples % self.language_sample_every == 0:
            self.languages[detect_language(_language_text(example))] += 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready statistics (counts, histograms, roles, languages)."""
        duplicates = sum(self.issues.get("dropped", Counter())[rule] for rule in DUPLICATE_RULES)
        sampled = sum(self.languages.values())
        return {
            "stages": dict(self.stages),
            "rows_with_fixes": self.rows_with_fixes,
            "issues": {action: dict(rules.most_common()) for action, rules in sorted(self.issues.items())},
            "duplicates": duplicates,
            "examples": self.examples,
            "splits": dict(self.splits),
            "tokens": {**_summary(self.token_lengths), "trained": _summary(self.trained_lengths),
                       "uncounted": self.uncounted, "truncated": self.truncated, "max_seq_len": self.max_seq_len,
                       "histogram": _buckets(self.token_lengths, self.max_seq_len),
                       "trained_histogram": _buckets(self.trained_lengths, self.max_seq_len)},
            "roles": {
                "chat_examples": self.chat_examples,
                "text_examples": self.examples - self.chat_examples,
                "messages": dict(self.messages_per_role),
                "mean_chars": {role: round(self.chars_per_role[role] / count, 1)
                               for role, count in self.messages_per_role.items()},
                "turns_per_example": {str(turns): n for turns, n in sorted(self.turns.items())},
                "system_prompt_share": round(self.with_system / self.chat_examples, 4) if self.chat_examples else 0.0,
            },
            "languages": {
                "sampled": sampled,
                "counts": dict(self.languages.most_common()),
                "shares": {code: round(n / sampled, 4) for code, n in self.languages.most_common()},
            },
        }

    def histogram_png(self) -> bytes:
        """The token length histogram (all and trained tokens, with the max_seq_len line) as a PNG."""
        # the object API with the Agg canvas: no pyplot, no global backend switch in a shared process
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        buckets = _buckets(self.token_lengths, self.max_seq_len)
        trained = {bucket["label"]: bucket["count"] for bucket in _buckets(self.trained_lengths, self.max_seq_len)}
        labels = [bucket["label"] for bucket in buckets]
        figure = Figure(figsize=(8, 4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        positions = range(len(labels))
        axes.bar([p - 0.2 for p in positions], [b["count"] for b in buckets], width=0.4, label="tokens")
        axes.bar([p + 0.2 for p in positions], [trained.get(label, 0) for label in labels], width=0.4,
                 label="trained tokens")
        limit = self.max_seq_len
        for index, bucket in enumerate(buckets):
            if limit and bucket["min"] <= limit < bucket["max"]:
                where = index - 0.5 + (limit - bucket["min"]) / (bucket["max"] - bucket["min"])
                axes.axvline(where, color="red", linestyle="--", label=f"max_seq_len {limit}")
        axes.set_xticks(list(positions), labels, rotation=45, ha="right", fontsize=8)
        axes.set_xlabel("tokens per example")
        axes.set_ylabel("examples")
        counted = sum(self.token_lengths.values())
        axes.set_title(f"Token lengths ({counted} example(s) tokenized)")
        axes.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()


def _language_text(example: Example) -> str:
    if example.messages is None:
        return example.text or ""
    return "\n".join(str(m.get("content")) for m in example.messages
                     if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str))


def _summary(lengths: Counter[int]) -> dict[str, Any]:
    count = sum(lengths.values())
    if not count:
        return {"count": 0, "total": 0, "min": None, "max": None, "mean": None, "p50": None, "p90": None,
                "p95": None, "p99": None}
    total = sum(length * n for length, n in lengths.items())
    ordered = sorted(lengths.items())
    return {"count": count, "total": total, "min": ordered[0][0], "max": ordered[-1][0],
            "mean": round(total / count, 1), **{f"p{q}": _percentile(ordered, count, q) for q in (50, 90, 95, 99)}}


def _percentile(ordered: list[tuple[int, int]], count: int, q: int) -> int:
    rank = max(1, math.ceil(count * q / 100))  # nearest-rank percentile
    seen = 0
    for length, n in ordered:
        seen += n
        if seen >= rank:
            return length
    return ordered[-1][0]


def _buckets(lengths: Counter[int], max_seq_len: int | None) -> list[dict[str, Any]]:
    """Power-of-two buckets ``[lo, hi)`` from 0 up to the larger of the longest example and max_seq_len."""
    if not lengths:
        return []
    top = max(max(lengths), max_seq_len or 0)
    edges = [0, 16]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    counts = [0] * (len(edges) - 1)
    for length, n in lengths.items():
        index = 0 if length < 16 else min(length.bit_length() - 4, len(counts) - 1)
        counts[index] += n
    return [{"min": lo, "max": hi, "label": f"{lo}-{hi - 1}", "count": n}
            for lo, hi, n in zip(edges, edges[1:], counts, strict=False)]
