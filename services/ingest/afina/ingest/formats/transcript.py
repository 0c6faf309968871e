"""Chat logs with speaker prefixes (seed 003's ``conversation.log``: ``VOCÊ: ...`` / ``AEON: ...``).

A line starting with a speaker prefix opens a turn; the lines after it continue that
turn (single blank lines inside an answer are kept). Lines matching an
``ignore_patterns`` regex, and lines before the first speaker, are noise. A run of
``conversation_gap`` blank lines starts a new conversation. Within a conversation a
user turn the assistant never answered is dropped and reported, an assistant turn with
no question before it is dropped and reported, and consecutive assistant turns are
merged into one answer.

Prefixes match case-insensitively, and also in their mojibake'd form (``VOCÃŠ:``, a
UTF-8 log once read as Windows-1252, as the seed itself shows): the head of a line is
compared after an ftfy fix.

``ignore_patterns`` run with RE2, never with Python's backtracking ``re``: a user's pattern
is matched against every line, and ``^(a|a)*$`` on a long line would take ``re`` forever.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from afina.core.datasets.options import TranscriptOptions, compile_ignore_pattern
from afina.core.errors import InvalidRequest
from afina.ingest.records import Example, RowIssue

_HEAD_CHARS = 40  # a speaker prefix is near the start of the line


@dataclass
class Turn:
    role: str
    line: int
    lines: list[str]
    mojibake: bool = False

    @property
    def content(self) -> str:
        return "\n".join(self.lines).strip()


@dataclass
class _Conversation:
    turns: list[Turn] = field(default_factory=list)


class TranscriptParser:
    """Compiled once per upload from ``TranscriptOptions``."""

    def __init__(self, options: TranscriptOptions) -> None:
        self.options = options
        self.prefixes = sorted(((prefix.strip(), role) for prefix, role in options.speakers.items()),
                               key=lambda item: -len(item[0]))
        self.mojibake_prefixes = [(variant, role) for prefix, role in self.prefixes
                                  for variant in _mojibake_forms(prefix)]
        self.ignore = []
        for index, pattern in enumerate(options.ignore_patterns):  # validated with the options; checked again
            try:
                self.ignore.append(compile_ignore_pattern(pattern))
            except ValueError as exc:
                raise InvalidRequest(f"transcript.ignore_patterns[{index}] {exc}",
                                     param=f"transcript.ignore_patterns[{index}]") from None

    def looks_like_transcript(self, text: str) -> bool:
        """At least one user and one assistant prefix start lines of ``text``."""
        roles = set()
        for line in text.split("\n", 2000)[:2000]:
            matched = self._speaker(line)
            if matched:
                roles.add(matched[0])
                if {"user", "assistant"} <= roles:
                    return True
        return False

    def parse(self, text: str, source: str, first_line: int = 1) -> Iterator[Example | RowIssue]:
        conversations, noise = self._conversations(text, first_line)
        if noise:
            count, first = noise
            yield RowIssue(source, first, "line", "transcript_noise", "warning",
                           f"ignored {count} line(s) that belong to no speaker turn or match ignore_patterns "
                           f"(first at line {first})")
        found_turn = False
        for conversation in conversations:
            found_turn = found_turn or bool(conversation.turns)
            yield from self._examples(conversation, source)
        if not found_turn:
            prefixes = ", ".join(repr(prefix) for prefix, _ in self.prefixes)
            yield RowIssue(source, first_line, "text", "transcript_no_turns", "error",
                           f"no line starts with a speaker prefix ({prefixes}); set transcript.speakers to the "
                           f"prefixes this log uses")

    def _conversations(self, text: str, first_line: int) -> tuple[list[_Conversation], tuple[int, int] | None]:
        conversations = [_Conversation()]
        current: Turn | None = None
        blanks = 0
        noise_count, noise_first = 0, 0
        gap = self.options.conversation_gap
        for offset, line in enumerate(text.split("\n")):
            number = first_line + offset
            if not line.strip():
                blanks += 1
                if gap and blanks == gap and conversations[-1].turns:
                    conversations.append(_Conversation())
                    current = None
                continue
            if any(pattern.search(line) for pattern in self.ignore):
                noise_count, noise_first = noise_count + 1, noise_first or number
                blanks = 0
                continue
            matched = self._speaker(line)
            if matched is not None:
                role, content, mojibake = matched
                current = Turn(role, number, [content] if content else [], mojibake)
                conversations[-1].turns.append(current)
            elif current is not None:
                current.lines.extend([""] * min(blanks, 1))  # a paragraph break inside one answer
                current.lines.append(line.rstrip())
            else:
                noise_count, noise_first = noise_count + 1, noise_first or number
            blanks = 0
        return conversations, (noise_count, noise_first) if noise_count else None

    def _speaker(self, line: str) -> tuple[str, str, bool] | None:
        """(role, rest of the line, matched through a mojibake fix) when the line opens a turn."""
        stripped = line.lstrip().lstrip("\ufeff")
        folded = stripped[:_HEAD_CHARS].casefold()
        for prefix, role in self.prefixes:
            if folded.startswith(prefix.casefold()):
                return role, stripped[len(prefix):].strip(), False
        for variant, role in self.mojibake_prefixes:
            if folded.startswith(variant.casefold()):
                return role, stripped[len(variant):].strip(), True
        head_end = stripped.find(":", 0, _HEAD_CHARS)
        if head_end > 0 and not stripped[:head_end].isascii():
            import ftfy

            head = stripped[:head_end + 1]
            fixed = ftfy.fix_text(head).casefold()
            for prefix, role in self.prefixes:
                if fixed == prefix.casefold():
                    return role, stripped[len(head):].strip(), True
        return None

    def _examples(self, conversation: _Conversation, source: str) -> Iterator[Example | RowIssue]:
        system: list[Turn] = []
        exchanges: list[tuple[Turn, Turn]] = []
        pending: Turn | None = None
        for turn in conversation.turns:
            if not turn.content:
                yield RowIssue(source, turn.line, "turn", "empty_turn", "dropped",
                               f"the {turn.role} turn has no text; dropped")
                continue
            if turn.role == "system":
                if exchanges or pending:
                    yield RowIssue(source, turn.line, "turn", "misplaced_system_turn", "dropped",
                                   "a system turn after the conversation started; dropped")
                else:
                    system.append(turn)
            elif turn.role == "user":
                if pending is not None:
                    yield _unanswered(source, pending)
                pending = turn
            elif pending is not None:
                exchanges.append((pending, turn))
                pending = None
            elif exchanges:
                previous = exchanges[-1][1]
                previous.lines.extend(["", *turn.lines])
                yield RowIssue(source, turn.line, "turn", "merged_assistant_turns", "fixed",
                               f"a second assistant turn in a row was joined to the answer at line {previous.line}")
            else:
                yield RowIssue(source, turn.line, "turn", "unprompted_turn", "dropped",
                               "an assistant turn with no user turn before it; dropped")
        if pending is not None:
            yield _unanswered(source, pending)
        size = self.options.max_turns_per_example or len(exchanges) or 1
        for start in range(0, len(exchanges), size):
            chunk = exchanges[start:start + size]
            messages = [{"role": "system", "content": "\n".join(turn.content for turn in system)}] if system else []
            turns = [turn for pair in chunk for turn in pair]
            for turn in turns:
                messages.append({"role": turn.role, "content": turn.content})
            example = Example(source, chunk[0][0].line, messages=messages)
            if any(turn.mojibake for turn in [*system, *turns]):
                example.issues.append(RowIssue(source, chunk[0][0].line, "turn", "mojibake_speaker_prefix", "fixed",
                                               "speaker prefixes written in mojibake (e.g. 'VOCÃŠ:' for 'VOCÊ:') "
                                               "were recognized"))
            yield example


def _unanswered(source: str, turn: Turn) -> RowIssue:
    return RowIssue(source, turn.line, "turn", "unanswered_turn", "dropped",
                    "a user turn the assistant never answered; dropped")


def _mojibake_forms(prefix: str) -> list[str]:
    """``VOCÊ:`` as it looks after a UTF-8 file was decoded as Windows-1252 or latin-1."""
    forms = []
    for codec in ("cp1252", "latin-1"):
        try:
            variant = prefix.encode("utf-8").decode(codec)
        except UnicodeDecodeError:
            continue
        if variant != prefix and variant not in forms:
            forms.append(variant)
    return forms
