"""Sorting a short list of digits, with a selection-sort trace as rich feedback.

"sort 52813=" -> "12358". The trace replays selection sort position by position (the
remaining digits, the smallest of them, what the student wrote) and stops at the first
out-of-place element, saying what belonged there and why the written one does not.
"""

from __future__ import annotations

import string

from .base import (
    Feedback,
    Problem,
    Task,
    first_mismatch,
    oracle_from_answers,
    register_task,
    sample_problems,
    show_char,
    show_text,
)


@register_task
class Sorting(Task):
    """Sort `length` digits (drawn with repetition) ascending, written without separators.

    Options:
        length: how many digits, 2 to 20 (default 5).

    Reward: 1.0 for the exact sorted string, else 0.0.
    Oracle: the one answer's next character (END after its last); for a wrong prefix, the
    answer's character at the student's position (END past its length).
    Train and eval split by the multiset of digits, so an eval answer never appears in
    training.
    """

    name = "sorting"

    def __init__(self, *, length: int = 5):
        if not (isinstance(length, int) and 2 <= length <= 20):
            raise ValueError(f"sorting: length must be an int in [2, 20], got {length!r}")
        self.length = length
        # One more than the answer lets an overlong response show.
        self.max_response_chars = length + 1

    def problems(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        def draw(rng):
            digits = "".join(rng.choice(string.digits) for _ in range(self.length))
            answer = "".join(sorted(digits))
            return answer, Problem(prompt=f"sort {digits}=", solution=answer, meta={"digits": digits})

        return sample_problems(self.name, n, seed, split, draw)

    def verify(self, problem: Problem, response: str) -> Feedback:
        correct = response == problem.solution
        return Feedback(reward=float(correct), correct=correct, text=self._trace(problem, response))

    def oracle(self, problem: Problem, prefix: str) -> dict[str, float]:
        return oracle_from_answers((problem.solution,), prefix)

    def _trace(self, problem: Problem, response: str) -> str:
        digits, answer = problem.meta["digits"], problem.solution
        first = first_mismatch(answer, response)
        lines = [f"sort {digits}: write the smallest remaining digit at each position -> {answer}"]
        remaining = list(digits)
        for index in range(len(answer) if first is None else first + 1):
            position = index + 1
            wrote = response[index] if index < len(response) else None
            if index == len(answer):
                lines.append(
                    f"position {position}: no digits remain, the answer ends; you wrote {show_char(wrote)}"
                    " <- first error: extra character"
                )
                break
            smallest = answer[index]
            line = f"position {position}: remaining {''.join(remaining)}, smallest {smallest}; you wrote "
            if index != first:
                lines.append(line + smallest)
                remaining.remove(smallest)
            elif wrote is None:
                lines.append(line + f"nothing <- first error: the answer stopped with {len(remaining)} digits left")
            elif wrote in remaining:
                lines.append(
                    line + f"{wrote} <- first error: {wrote} is out of place, {smallest} is smaller and not yet written"
                )
            else:
                lines.append(line + f"{show_char(wrote)} <- first error: not one of the remaining digits")
        lines.append(f"your answer {show_text(response)} is {'correct' if first is None else 'wrong'}")
        return "\n".join(lines)
