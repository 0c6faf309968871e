"""Paired folders (seed 001's "modo pastas"): ``inputs/x.txt`` + ``outputs/x.json`` -> one example.

Files pair by their path inside the folder without the extension (``inputs/a/b.txt``
pairs with ``outputs/a/b.md``). The input fills the prompt template (``{input}`` is its
text, ``{name}`` its base name), the output is the assistant's answer. A file with no
partner is dropped and reported. All member texts are held until the archive ends
(the archive caps bound them): the two halves of a pair can come in any order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from afina.core.datasets.options import PairedOptions
from afina.ingest.records import Example, RowIssue, SourceRow
from afina.ingest.sources.archive import PAIRED_MEMBER_KEY, PAIRED_TEXT_KEY

_TEMPLATE_FIELDS = re.compile(r"\{(input|name)\}")


@dataclass(frozen=True)
class _Side:
    source: str
    text: str


def pair_examples(rows: Iterable[SourceRow | RowIssue], options: PairedOptions) -> Iterator[Example | RowIssue]:
    inputs: dict[str, _Side] = {}
    outputs: dict[str, _Side] = {}
    for row in rows:
        if isinstance(row, RowIssue):
            yield row
            continue
        value = row.value
        if not isinstance(value, dict) or PAIRED_MEMBER_KEY not in value:
            yield RowIssue(row.source, row.line, "file", "paired_not_a_member", "error",
                           "format 'paired' reads an archive with input and output folders; this record is not a "
                           "file of such an archive")
            continue
        member = str(value[PAIRED_MEMBER_KEY])
        side, key = _side_and_key(member, options)
        if side is None:
            yield RowIssue(row.source, row.line, "file", "paired_unexpected_file", "dropped",
                           f"not inside '{options.inputs_dir}/' or '{options.outputs_dir}/'; ignored")
            continue
        bucket = inputs if side == "input" else outputs
        if key in bucket:
            yield RowIssue(row.source, row.line, "file", "paired_duplicate_name", "dropped",
                           f"another {side} file has the same base name {key!r} ({bucket[key].source}); dropped")
            continue
        bucket[key] = _Side(row.source, str(value[PAIRED_TEXT_KEY]))
    for key, given in inputs.items():
        expected = outputs.pop(key, None)
        if expected is None:
            yield RowIssue(given.source, 0, "file", "paired_missing_output", "dropped",
                           f"no file named {key}.* in '{options.outputs_dir}/' to pair with; dropped")
            continue
        prompt = _render(options.prompt_template, given.text, key.rsplit("/", 1)[-1])
        yield Example(given.source, 1, messages=[{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": expected.text}])
    for key, expected in outputs.items():
        yield RowIssue(expected.source, 0, "file", "paired_missing_input", "dropped",
                       f"no file named {key}.* in '{options.inputs_dir}/' to pair with; dropped")


def _render(template: str, text: str, name: str) -> str:
    """Only ``{input}`` and ``{name}`` are replaced: other braces in the template stay as written."""
    return _TEMPLATE_FIELDS.sub(lambda match: text if match.group(1) == "input" else name, template)


def _side_and_key(member: str, options: PairedOptions) -> tuple[str | None, str]:
    for side, folder in (("input", options.inputs_dir), ("output", options.outputs_dir)):
        prefix = folder.strip("/") + "/"
        if member.startswith(prefix):
            relative = PurePosixPath(member[len(prefix):])
            if not relative.name:  # the folder itself ("inputs/", "inputs/."): no file to pair
                return None, member
            return side, str(relative.with_suffix(""))
    return None, member
