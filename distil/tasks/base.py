"""The task interface of the trainer: problems, verifiers with rich feedback, oracles.

A task is what DistIL learns from. It deals problems (a prompt and one canonical
solution), verifies a student's response (a reward and the rich feedback: an execution
trace showing where the response first goes wrong) and, being a program, acts as a
black-box expert: `oracle` gives the distribution over the next character that the task
would write after the student's prefix. The trainer turns that distribution into the
sparse expert targets of `distil_loss`.

Everything a task writes is printable ASCII plus "\\n", because the demo student reads
with a character tokenizer over printable ASCII.
"""

from __future__ import annotations

import inspect
import random
import string
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "END",
    "SPLITS",
    "Feedback",
    "Problem",
    "Task",
    "check_batch",
    "first_mismatch",
    "get_task",
    "is_printable",
    "oracle_from_answers",
    "register_task",
    "sample_problems",
    "show_char",
    "show_text",
    "split_of",
    "task_names",
    "to_printable",
]

# Key in an oracle distribution meaning "the response ends here".
END = "<end>"

SPLITS = ("train", "eval")
# One problem in EVAL_BUCKETS (by a stable hash of its key) belongs to "eval".
EVAL_BUCKETS = 10

_PRINTABLE = frozenset(string.printable) - frozenset("\t\r\x0b\x0c")
_VISIBLE = frozenset(string.digits + string.ascii_letters + string.punctuation)


def is_printable(text: str) -> bool:
    """Whether `text` is printable ASCII plus "\\n" only."""
    return all(c in _PRINTABLE for c in text)


def to_printable(text: str) -> str:
    """`text` with every character outside printable ASCII and "\\n" escaped ("\\x07")."""
    return "".join(c if c in _PRINTABLE else c.encode("unicode_escape").decode("ascii") for c in text)


def show_char(char: str) -> str:
    """One response character for a trace: bare when visible, quoted otherwise (' ')."""
    return char if char in _VISIBLE else f"'{to_printable(char)}'"


def show_text(text: str) -> str:
    """A response for a trace: quoted, so empty and blank responses show."""
    return f'"{to_printable(text)}"'


@dataclass(frozen=True)
class Problem:
    """One problem: what the student sees and one correct response.

    `meta` holds the task's data (operands, hidden tests, ...). It is left out of equality
    and hashing: two problems with the same prompt and solution are the same problem.
    """

    prompt: str
    solution: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("prompt", "solution"):
            if not is_printable(getattr(self, name)):
                raise ValueError(f"Problem.{name} must be printable ASCII, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Feedback:
    """A verifier's verdict on one response.

    reward: in [0, 1]; each task documents its partial credit.
    correct: the response solves the problem.
    text: the rich feedback, an execution trace marking where the response first goes
        wrong; printable ASCII plus "\\n".
    """

    reward: float
    correct: bool
    text: str

    def __post_init__(self):
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(f"Feedback.reward must be in [0, 1], got {self.reward!r}")
        if not is_printable(self.text):
            raise ValueError(f"Feedback.text must be printable ASCII, got {self.text!r}")


class Task(ABC):
    """A task: deals problems, verifies responses, and acts as an expert.

    Subclasses set `name` (the registry key) and `max_response_chars` (rollouts stop
    after that many characters) and take their options as keyword arguments.
    """

    name: ClassVar[str]
    max_response_chars: int

    @abstractmethod
    def problems(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        """`n` problems drawn with replacement, deterministic in (seed, split); "train"
        and "eval" never share a problem (see `sample_problems`)."""

    @abstractmethod
    def verify(self, problem: Problem, response: str) -> Feedback:
        """The reward and the rich feedback for `response` to `problem`."""

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Feedback]:
        """`verify` on each pair; tasks with expensive verifiers override it."""
        check_batch(problems, responses)
        return [self.verify(p, r) for p, r in zip(problems, responses)]

    @abstractmethod
    def oracle(self, problem: Problem, prefix: str) -> dict[str, float]:
        """The task's distribution over the next character (or END) after `prefix`.

        Probabilities sum to 1. For a prefix that is still correct: the next characters
        of the correct answers that continue it. For a prefix already wrong: the task's
        documented recovery.
        """


def check_batch(problems: Sequence[Problem], responses: Sequence[str]) -> None:
    if len(problems) != len(responses):
        raise ValueError(f"problems and responses must have the same length, got {len(problems)} and {len(responses)}")


# --------------------------------------------------------------------------------------
# Shared machinery: splits, sampling, oracles over a finite set of answers.
# --------------------------------------------------------------------------------------
def split_of(key: str) -> str:
    """The split a problem belongs to, by a stable hash of its key (crc32: Python's own
    str hash changes from process to process)."""
    return "eval" if zlib.crc32(key.encode()) % EVAL_BUCKETS == 0 else "train"


def sample_problems(
    task: str, n: int, seed: int, split: str, draw: Callable[[random.Random], tuple[str, Problem]]
) -> list[Problem]:
    """`n` problems from `draw` (which returns a problem and its key) that fall in `split`.

    The generator is seeded by (task, seed, split), so the list is the same in every
    process; the split is a hash partition of the keys, so "train" and "eval" never share
    a problem whatever the seeds. Draws are with replacement.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = random.Random(f"{task}/{seed}/{split}")
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        key, problem = draw(rng)
        if split_of(key) == split:
            out.append(problem)
            misses = 0
        else:
            misses += 1
            if misses > 10_000:
                raise ValueError(f"task {task!r}: no {split!r} problems found; its options leave too few problems")
    return out


def first_mismatch(expected: str, got: str) -> int | None:
    """Index of the first character where `got` departs from `expected` (a missing or an
    extra character counts), None when they are equal."""
    for i, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            return i
    return None if len(expected) == len(got) else min(len(expected), len(got))


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def oracle_from_answers(answers: Sequence[str], prefix: str) -> dict[str, float]:
    """The next-character distribution of an expert that writes one of `answers`, each
    equally likely, given the student's `prefix`.

    Prefix still correct (some answers start with it): the next character of each such
    answer, END for an answer equal to the prefix; answers that continue alike add up.
    Prefix already wrong: the answers sharing the longest prefix with it, each at the
    position the student is at (its character there, END past its length). A response
    cannot be edited, so no continuation is correct any more; this recovery teaches the
    character that belongs at each position, which is what the student lacked.
    """
    if not answers:
        raise ValueError("answers must not be empty")
    followed = [a for a in answers if a.startswith(prefix)]
    if not followed:
        overlap = [_common_prefix_len(a, prefix) for a in answers]
        followed = [a for a, k in zip(answers, overlap) if k == max(overlap)]
    counts = Counter(a[len(prefix)] if len(a) > len(prefix) else END for a in followed)
    return {char: count / len(followed) for char, count in counts.items()}


# --------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` available to `get_task` under `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must set a non-empty str `name` to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"task name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def task_names() -> tuple[str, ...]:
    """The registered task names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_task(name: str, **kwargs: Any) -> Task:
    """The registered task `name`, built with its keyword options."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}")
    cls = _REGISTRY[name]
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        options = ", ".join(signature.parameters) or "none"
        raise TypeError(f"task {name!r}: {error}; its options are: {options}") from None
    return cls(**kwargs)
