"""One uploaded file → one content-addressed dataset version, streamed stage by stage.

    reader → converter → repair → validate → dedup → token check (batched) → split → files

Every stage is a generator or a per-example call, so memory stays bounded whatever the
file's size: split files and the report stream to temp files, stats are histograms, the
deduplicator keeps fixed-size fingerprints, and only ``preview_count`` examples are held.
The per-example stages (repair, validate, render and tokenize, serialize) run in batches
(``examples``), in worker processes for large files; reading, deduplicating, counting and
writing stay in this process, in file order, so the output does not depend on how many
processes did the work.

Tokenizing is most of the cost. Every row that could exceed ``max_seq_len`` is tokenized
(its UTF-8 size bounds its token count), so every verdict is exact; of the rows that surely
fit, files above ``EXACT_TOKEN_COUNT_BYTES`` tokenize a sample for the length statistics
(``stats.json`` counts the rest as ``uncounted``).

The version's key derives from the raw bytes (sha256), the canonical options and the
tokenizer, so ingesting the same input twice finds the first result. Objects go to the
store under that prefix and ``manifest.json`` goes last: a prefix without a manifest is
an unfinished attempt, and the next attempt simply writes it again. Split objects are
named by their own sha256, so two attempts racing on one version (the file's own ingest
and a job's) never mix their bytes: each manifest names exactly what its run wrote.

Strict mode fails the file on the first error rows (named: file, line, field, rule);
lenient mode drops them. Either way the report is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import SecretStr

from afina.core.artifacts.dataset import DATASET_MANIFEST, DatasetManifest, DatasetSource, SplitFile
from afina.core.catalog import CATALOG, ChatFamily, resolve_base_model
from afina.core.datasets.at_rest import SCHEME, check_key, encrypt_file
from afina.core.datasets.layout import INGEST_ARTIFACTS, dataset_version_prefix
from afina.core.datasets.options import SPLIT_NAMES, IngestOptions
from afina.core.errors import DatasetInvalid, InvalidRequest
from afina.core.store import ArtifactStore
from afina.core.store.base import sha256_file
from afina.ingest import tokens
from afina.ingest.dedup import Deduplicator
from afina.ingest.examples import BatchContext, BatchRunner, Prepared, dedup_stand_in
from afina.ingest.formats import to_examples
from afina.ingest.preview import render_preview, render_preview_html
from afina.ingest.records import Example, RowIssue, SourceRow
from afina.ingest.report import ReportWriter
from afina.ingest.sources import open_rows
from afina.ingest.split import Splitter
from afina.ingest.stats import StatsCollector

PIPELINE_VERSION = 1  # bump when the output of the same input and options changes
DEFAULT_MODEL = "smollm2-135m-instruct"  # the model whose tokenizer measures a file uploaded without one
TOKEN_BATCH = 512  # rows per batch of per-example work (one tokenizer call each)
PARALLEL_MIN_BYTES = 32 * 1024 * 1024  # smaller files are done in the worker's own process
WRITE_BUFFER = 1024 * 1024
EXACT_TOKEN_COUNT_BYTES = 64 * 1024 * 1024  # files up to this get every row tokenized (exact statistics)
TOKEN_SAMPLE_EVERY = 100  # above it, 1 row in 100 (and every row that could be too long) is tokenized


@dataclass(frozen=True)
class IngestSource:
    """The raw upload: where it is and what it is (the sha256 is the store's, taken at upload)."""

    tenant_id: str
    raw_key: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class IngestProgress:
    """A progress event: rows read from the file so far, examples kept, issues reported."""

    rows: int
    examples: int
    issues: int
    stage: str  # "reading", "writing", "done"
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "examples": self.examples, "issues": self.issues, "stage": self.stage,
                "elapsed_s": round(self.elapsed_s, 2)}


ProgressCallback = Callable[[IngestProgress], None]


@dataclass
class IngestResult:
    """A committed version: its store prefix and manifest; ``reused`` when an earlier run had made it."""

    version_key: str
    manifest: DatasetManifest
    reused: bool = False
    processes: int = 0  # worker processes this run used (0: all in the calling process)

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest.summary or {}


class IngestFailed(DatasetInvalid):
    """The file cannot become a dataset; the report (and summary) of the attempt are still written."""

    def __init__(self, message: str, *, version_key: str, summary: dict[str, Any], line: int | None = None,
                 rule: str | None = None) -> None:
        super().__init__(message, line=line, rule=rule)
        self.reason = message
        self.version_key = version_key
        self.summary = summary


# content address ---------------------------------------------------------------

def model_for(options: IngestOptions, store: ArtifactStore | None = None) -> str:
    """The model whose tokenizer measures this file: the options', else the catalog's default.

    ``store`` reads a ``store://`` base model's family and tokenizer; every caller that can meet one passes it.
    """
    if options.base_model:
        return resolve_base_model(options.base_model, store=store).id
    return DEFAULT_MODEL if DEFAULT_MODEL in CATALOG else next(iter(CATALOG))


def canonical_options(options: IngestOptions, store: ArtifactStore | None = None) -> dict[str, Any]:
    """Every option with its value (defaults included), the model resolved: what the output depends on."""
    values = options.model_dump(mode="json")
    values["base_model"] = model_for(options, store)
    return values


def version_id(raw_sha256: str, options: IngestOptions, store: ArtifactStore | None = None) -> str:
    spec = resolve_base_model(model_for(options, store), store=store)
    material = orjson.dumps({"raw": raw_sha256, "options": canonical_options(options, store), "model": spec.id,
                             "tokenizer": spec.hf_repo, "pipeline": PIPELINE_VERSION}, option=orjson.OPT_SORT_KEYS)
    return "v-" + hashlib.sha256(material).hexdigest()[:24]


def version_key(source: IngestSource, options: IngestOptions, store: ArtifactStore | None = None) -> str:
    return dataset_version_prefix(source.tenant_id, version_id(source.sha256, options, store))


def read_manifest(store: ArtifactStore, key: str) -> DatasetManifest | None:
    """The committed manifest of the dataset at ``key``; None when nothing was committed there."""
    return DatasetManifest.read(store, f"{key}/{DATASET_MANIFEST}")


# the run -------------------------------------------------------------------------

@dataclass
class _Run:
    """The state of one ingest run; small by construction (no rows kept beyond the preview)."""

    options: IngestOptions
    report: ReportWriter
    split_files: dict[str, IO[bytes]]
    stats: StatsCollector
    counts: Counter[str] = field(default_factory=Counter)
    split_counts: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    preview: list[Example] = field(default_factory=list)
    fatal: list[RowIssue] = field(default_factory=list)

    @property
    def strict(self) -> bool:
        return self.options.mode == "strict"

    def issue(self, issue: RowIssue) -> RowIssue:
        """Report one issue; in lenient mode an error is what was done about it: the row is dropped.

        length_policy ``fail`` is the exception: its ``too_long`` error fails the file in either mode.
        """
        if issue.rule == "too_long" and issue.action == "error":
            self.counts["fatal"] += 1
            if not self.fatal:
                self.fatal.append(issue)
        elif issue.action == "error" and not self.strict:
            issue = replace(issue, action="dropped")
        self.report.add(issue)
        return issue


def token_count_every(raw_bytes: int) -> int:
    """1 (tokenize every row, exact statistics) up to ``EXACT_TOKEN_COUNT_BYTES``; a sample above it.

    The verdict on every row stays exact either way (``tokens.LengthChecker``): a row that could
    exceed max_seq_len is always tokenized; only the length statistics are then a sample.
    """
    return 1 if raw_bytes <= EXACT_TOKEN_COUNT_BYTES else TOKEN_SAMPLE_EVERY


def language_sample_every(raw_bytes: int) -> int:
    """Language detection costs ~1 ms a call: 1 in 50 examples for most files, 1 in 250 for large ones."""
    return 50 if raw_bytes <= EXACT_TOKEN_COUNT_BYTES else 250


def ingest_file(store: ArtifactStore, source: IngestSource, options: IngestOptions, *, work_dir: Path,
                model_cache_dir: Path, data_key: SecretStr | None = None, progress: ProgressCallback | None = None,
                progress_every: int = 10_000, tokenizer: tokens.IngestTokenizer | None = None,
                processes: int = 0, parallel_min_bytes: int = PARALLEL_MIN_BYTES) -> IngestResult:
    """Make (or find) the dataset version of ``source`` under ``options``; ``IngestFailed`` if it cannot be one.

    ``model_cache_dir`` is where the base model's tokenizer is (or is built, once, from the catalog's
    GGUF); ``tokenizer`` skips that (tests, benchmarks). ``progress`` is called every
    ``progress_every`` rows read, then once when writing starts and once when done. Files of at
    least ``parallel_min_bytes`` have their per-example work spread over ``processes`` worker
    processes (the output is the same bytes as in one process).
    """
    key = version_key(source, options, store)
    existing = read_manifest(store, key)
    if existing is not None:
        return IngestResult(version_key=key, manifest=existing, reused=True)
    if options.encrypt_at_rest:
        check_key(data_key)  # a missing or bad key fails now, not after an hour of work
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="afina-ingest-", dir=work_dir))
    try:
        return _ingest(store, source, options, key, tmp, data_key, progress, max(1, progress_every), tokenizer,
                       model_cache_dir, processes, parallel_min_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ingest(store: ArtifactStore, source: IngestSource, options: IngestOptions, key: str, tmp: Path,
            data_key: SecretStr | None, progress: ProgressCallback | None, progress_every: int,
            tokenizer: tokens.IngestTokenizer | None, model_cache_dir: Path, processes: int,
            parallel_min_bytes: int) -> IngestResult:
    started = time.monotonic()
    raw_path = store.download_file(source.raw_key, tmp / "raw" / "upload")
    raw_bytes = raw_path.stat().st_size
    model_id = model_for(options, store)
    spec = resolve_base_model(model_id, store=store)
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_for(model_id, str(model_cache_dir), store)
    context = BatchContext(options=options, tokenizer=tokenizer, family=spec.family,
                           count_every=token_count_every(raw_bytes))
    run = _Run(options=options, report=ReportWriter(tmp / "report.jsonl"),
               split_files={name: open(tmp / f"{name}.jsonl", "wb", buffering=WRITE_BUFFER)  # noqa: SIM115
                            for name in SPLIT_NAMES},
               stats=StatsCollector(max_seq_len=options.max_seq_len,
                                    language_sample_every=language_sample_every(raw_bytes)))
    splitter = Splitter(options.split)
    dedup = Deduplicator(options.deduplicate)

    def tick(stage: str = "reading") -> None:
        if progress is not None:
            progress(IngestProgress(rows=run.counts["rows"], examples=sum(run.split_counts.values()),
                                    issues=run.report.total, stage=stage, elapsed_s=time.monotonic() - started))

    def counted(rows: Iterable[SourceRow]) -> Iterator[SourceRow]:
        for row in rows:
            if row.line:  # line 0: a note about the whole file, not a row
                run.counts["rows"] += 1
                if run.counts["rows"] % progress_every == 0:
                    tick()
            yield row

    failure: IngestFailed | None = None
    try:
        with BatchRunner(context, processes=processes if raw_bytes >= parallel_min_bytes else 0,
                         batch_size=TOKEN_BATCH) as runner:
            used_processes = runner.processes
            try:
                items = to_examples(counted(open_rows(raw_path, source.filename, options)), options)
                for prepared in runner.run(items):
                    if isinstance(prepared, RowIssue):
                        _row_issue(run, prepared)
                    else:
                        _keep_or_drop(run, prepared, dedup, splitter)
            except (DatasetInvalid, InvalidRequest) as exc:  # the whole file (encoding, archive, key): nothing kept
                rule = getattr(exc, "rule", None) or exc.code or "invalid_file"
                line = getattr(exc, "line", None)
                run.report.add(RowIssue(source.filename, line or 0, "file", rule, "error", exc.message))
                failure = IngestFailed(exc.message, version_key=key, summary={}, line=line, rule=rule)
        for handle in run.split_files.values():
            handle.close()
        if failure is None:
            failure = _check_outcome(run, splitter, key, source)
        tick("writing")
        run.report.close()
        summary = _summary(run, model_id)
        _count_stages(run)
        stats = {**run.stats.as_dict(), "counts": summary["counts"]}
        store.put_file(f"{key}/{INGEST_ARTIFACTS['report'][0]}", run.report.path)
        store.put_bytes(f"{key}/{INGEST_ARTIFACTS['stats'][0]}", orjson.dumps(stats, option=orjson.OPT_INDENT_2))
        if failure is not None:
            failure.summary = summary
            raise failure
        _write_preview_and_plot(store, key, run, tokenizer, spec.family)
        manifest = _commit_splits(store, key, tmp, run, source, options, summary, data_key)
        tick("done")
        return IngestResult(version_key=key, manifest=manifest, processes=used_processes)
    finally:
        run.report.close()
        for handle in run.split_files.values():
            handle.close()


@lru_cache(maxsize=4)
def _tokenizer_for(model_id: str, model_cache_dir: str, store: ArtifactStore | None = None) -> tokens.IngestTokenizer:
    """One loaded tokenizer per model for the worker's lifetime (loading takes ~0.1 s, building one ~10 s)."""
    return tokens.load_tokenizer(resolve_base_model(model_id, store=store), Path(model_cache_dir), store)


def _row_issue(run: _Run, issue: RowIssue) -> None:
    """An issue the reader or converter raised: a note about the file, or a row that gave no example."""
    issue = run.issue(issue)
    run.stats.add_issues([issue])
    if issue.action == "error":
        run.counts["invalid"] += 1
    elif issue.action == "dropped":
        run.counts["dropped"] += 1


def _keep_or_drop(run: _Run, prepared: Prepared, dedup: Deduplicator, splitter: Splitter) -> None:
    """Report what the per-example stages found, deduplicate, apply the length verdict, split and write.

    A row's statistics are counted once, when its fate is known.
    """
    example = prepared.example
    run.counts["converted"] += 1
    reported = [run.issue(issue) for issue in (*example.issues, *prepared.found)]
    if not prepared.valid:
        run.stats.add_issues(reported)
        run.counts["invalid"] += 1
        return
    duplicate = dedup.check(dedup_stand_in(prepared)) if prepared.duplicate_key is not None else None
    if duplicate is not None:
        run.stats.add_issues([*reported, run.issue(duplicate)])
        run.counts["duplicates"] += 1
        return
    result, line, digest = prepared.token, prepared.line, prepared.digest
    assert result is not None and line is not None and digest is not None
    token_issues = [run.issue(issue) for issue in result.issues]
    run.stats.add_issues([*reported, *token_issues])
    if not result.keep:
        run.counts["too_long" if any(issue.rule == "too_long" for issue in token_issues) else "invalid"] += 1
        return
    run.counts["truncated"] += int(result.truncated)
    split = splitter.assign(example) if example.split is not None else splitter.assign_digest(digest)
    run.split_files[split].write(line + b"\n")
    run.split_counts[split] += 1
    run.kinds["messages" if example.messages is not None else "text"] += 1
    run.stats.add_example(example, split, result)
    if len(run.preview) < run.options.preview_count:
        run.preview.append(example)


def _count_stages(run: _Run) -> None:
    counts = run.counts
    for stage, value in (("read", counts["rows"]), ("converted", counts["converted"]),
                         ("valid", counts["converted"] - counts["invalid"]),
                         ("unique", counts["converted"] - counts["invalid"] - counts["duplicates"]),
                         ("written", sum(run.split_counts.values()))):
        run.stats.count(stage, max(0, value))


def _check_outcome(run: _Run, splitter: Splitter, key: str, source: IngestSource) -> IngestFailed | None:
    """length_policy fail, strict-mode errors, too few examples, split minimums: the first that applies fails."""
    if run.fatal:
        first = run.fatal[0]
        return _failed(key, f"{run.counts['fatal']} example(s) are longer than max_seq_len and length_policy is "
                            f"'fail': {first.describe()}", line=first.line, rule=first.rule)
    errors = run.report.count("error")
    if run.strict and errors:
        first = run.report.first_errors[0]
        message = (f"{run.report.error_rows} row(s) have errors and ingest_options.mode is 'strict': "
                   f"{run.report.describe_errors()}")
        return _failed(key, message, line=first.line or None, rule=first.rule)
    kept = sum(run.split_counts.values())
    if kept < run.options.min_examples:
        removed = run.counts["invalid"] + run.counts["dropped"] + run.counts["duplicates"] + run.counts["too_long"]
        return _failed(key, f"{source.filename} has {kept} usable example(s) ({removed} row(s) removed: see the "
                            f"report); at least {run.options.min_examples} are required", rule="too_few_examples")
    problems = splitter.check_minimums(dict(run.split_counts))
    if problems:
        return _failed(key, "; ".join(problems), rule="split_too_small")
    return None


def _failed(key: str, message: str, *, line: int | None = None, rule: str | None = None) -> IngestFailed:
    return IngestFailed(message, version_key=key, summary={}, line=line, rule=rule)


def _summary(run: _Run, model_id: str) -> dict[str, Any]:
    counts = {"rows": run.counts["rows"], "converted": run.counts["converted"], "invalid": run.counts["invalid"],
              "dropped": run.counts["dropped"], "duplicates": run.counts["duplicates"],
              "too_long": run.counts["too_long"], "truncated": run.counts["truncated"],
              "examples": sum(run.split_counts.values())}
    return {"counts": counts, "splits": {name: run.split_counts[name] for name in SPLIT_NAMES},
            "issues": run.report.summary(), "first_errors": run.report.first_errors_as_dicts(),
            "issue_total": run.report.total, "model": model_id}


def _write_preview_and_plot(store: ArtifactStore, key: str, run: _Run, tokenizer: tokens.IngestTokenizer,
                            family: ChatFamily) -> None:
    n, limit = run.options.preview_count, run.options.max_seq_len
    text = render_preview(run.preview, tokenizer, family, n=n, max_seq_len=limit)
    page = render_preview_html(run.preview, tokenizer, family, n=n, max_seq_len=limit)
    store.put_bytes(f"{key}/{INGEST_ARTIFACTS['preview'][0]}", text.encode())
    store.put_bytes(f"{key}/{INGEST_ARTIFACTS['preview_html'][0]}", page.encode())
    store.put_bytes(f"{key}/{INGEST_ARTIFACTS['token_lengths_png'][0]}", run.stats.histogram_png())


def _commit_splits(store: ArtifactStore, key: str, tmp: Path, run: _Run, source: IngestSource,
                   options: IngestOptions, summary: dict[str, Any], data_key: SecretStr | None) -> DatasetManifest:
    """Put every non-empty split (encrypted if asked), then the manifest naming them: the commit."""
    splits: dict[str, SplitFile] = {}
    for name in SPLIT_NAMES:
        if not run.split_counts[name]:
            continue
        path = tmp / f"{name}.jsonl"
        if options.encrypt_at_rest:
            encrypted = tmp / f"{name}.jsonl.enc"
            encrypt_file(path, encrypted, data_key)
            os.replace(encrypted, path)
        digest = sha256_file(path)
        info = store.put_file(f"{key}/splits/{name}-{digest[:16]}.jsonl", path)
        splits[name] = SplitFile(key=info.key, sha256=info.sha256 or digest, bytes=info.size,
                                 examples=run.split_counts[name],
                                 encryption=SCHEME if options.encrypt_at_rest else None)
    kinds = set(run.kinds)
    manifest = DatasetManifest.build(
        format="openai-chat" if kinds == {"messages"} else ("text" if kinds == {"text"} else "mixed"),
        version=key.rsplit("/", 1)[-1],
        source=DatasetSource(filename=source.filename, sha256=source.sha256, key=source.raw_key),
        options=canonical_options(options, store),
        model=summary["model"],
        pipeline_version=PIPELINE_VERSION,
        counts={**summary["counts"], **{name: run.split_counts[name] for name in SPLIT_NAMES}},
        splits=splits,
        summary=summary,
        artifacts={name: f"{key}/{object_name}" for name, (object_name, _) in INGEST_ARTIFACTS.items()},
        created_at=int(time.time()),
    )
    manifest.write(store, f"{key}/{DATASET_MANIFEST}")  # last: the commit
    return manifest
