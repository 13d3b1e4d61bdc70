"""Addition with a column-by-column trace as rich feedback: the trainer's default task.

Small enough for a ~1M-parameter character-level transformer to learn on a 2-core CPU in
minutes, and the feedback is exactly the procedure the student has to learn: per column,
the digits, the carry in, the sum, the digit written and the carry out, with the first
column the response gets wrong marked.
"""

from __future__ import annotations

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
class Addition(Task):
    """a+b for operands of exactly `digits` digits (0-9 when digits=1).

    Options:
        digits: digits per operand, 1 to 9 (default 2: "47+85=", answers of 2-3 digits).
        reverse: write the answer least-significant digit first ("47+85=" -> "231").
            Default True: each written digit then depends only on its column and the carry
            just produced, which the student has already written, so the student can
            compute the answer in the order it writes it. Written most-significant digit
            first, the first digit depends on every carry below it; small transformers
            learn reversed addition from far fewer examples (Lee et al. 2023, "Teaching
            Arithmetic to Small Transformers").

    Reward: 1.0 for the exact answer (no leading zeros, no extra characters), else 0.0.
    Oracle: the one answer's next character (END after its last); for a wrong prefix, the
    answer's character at the student's position (END past its length).
    Train and eval split by the unordered operand pair, so 47+85 and 85+47 fall together.
    """

    name = "addition"

    def __init__(self, *, digits: int = 2, reverse: bool = True):
        if not (isinstance(digits, int) and 1 <= digits <= 9):
            raise ValueError(f"addition: digits must be an int in [1, 9], got {digits!r}")
        if not isinstance(reverse, bool):
            raise TypeError(f"addition: reverse must be a bool, got {reverse!r}")
        self.digits = digits
        self.reverse = reverse
        # The longest answer has digits + 1 characters; one more lets an overlong response show.
        self.max_response_chars = digits + 2

    def answer(self, a: int, b: int) -> str:
        """The response that is correct for a+b."""
        total = str(a + b)
        return total[::-1] if self.reverse else total

    def problems(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        high = 10**self.digits - 1

        def draw(rng):
            a, b = rng.randint(low, high), rng.randint(low, high)
            problem = Problem(prompt=f"{a}+{b}=", solution=self.answer(a, b), meta={"a": a, "b": b})
            return f"{min(a, b)}+{max(a, b)}", problem

        return sample_problems(self.name, n, seed, split, draw)

    def verify(self, problem: Problem, response: str) -> Feedback:
        correct = response == problem.solution
        return Feedback(reward=float(correct), correct=correct, text=self._trace(problem, response))

    def oracle(self, problem: Problem, prefix: str) -> dict[str, float]:
        return oracle_from_answers((problem.solution,), prefix)

    def _trace(self, problem: Problem, response: str) -> str:
        a, b = problem.meta["a"], problem.meta["b"]
        answer = problem.solution
        first = first_mismatch(answer, response)
        if self.reverse:
            header = f"{a}+{b} = {a + b}, written ones digit first: {answer}"
        else:
            header = f"{a}+{b} = {answer}"
        lines = [f"{header}; column by column from the ones:"]
        a_digits, b_digits = str(a)[::-1], str(b)[::-1]
        carry = 0
        for column in range(1, len(answer) + 1):
            digits = [int(d[column - 1]) for d in (a_digits, b_digits) if column <= len(d)]
            terms = [str(d) for d in digits] + ([f"carry {carry}"] if carry else [])
            total = sum(digits) + carry
            carry = total // 10
            line = f"column {column}: {'+'.join(terms)} = {total} -> write {total % 10}"
            line += f" carry {carry}" if carry else ""
            # Which character of the response this column is.
            index = column - 1 if self.reverse else len(answer) - column
            line += f"; you wrote {show_char(response[index]) if index < len(response) else 'nothing'}"
            if index == first:
                line += f" <- first error (character {index + 1} of your answer)"
            lines.append(line)
        if len(response) > len(answer):
            lines.append(
                f"after column {len(answer)} the answer ends; you wrote {show_text(response[len(answer) :])}"
                f" <- first error (character {len(answer) + 1} of your answer)"
            )
        lines.append(f"your answer {show_text(response)} is {'correct' if first is None else 'wrong'}")
        return "\n".join(lines)
