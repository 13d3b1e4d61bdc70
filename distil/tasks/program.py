"""Program synthesis from input/output examples; the rich feedback is an execution trace.

The prompt shows a few values of an integer function, "f(1)=5 f(2)=7 f(3)=9 f(x)=", and
the response is a Python expression in x ("2*x+3"). The verifier runs the expression in
the sandbox (distil.sandbox) on hidden test inputs and reports, per test, the input, the
expected value and what came back: a value, an exception or a timeout.

Only the inputs enter the sandbox; the expected values stay in the trainer. Generated code
can print whatever it likes, but to fake a passing test it would have to print the right
value, that is, compute the function: a forged pass is an earned one.
"""

from __future__ import annotations

import json
import math

from ..sandbox import RunResult, run_many
from .base import (
    Feedback,
    Problem,
    Task,
    check_batch,
    oracle_from_answers,
    register_task,
    sample_problems,
    show_text,
    to_printable,
)

# Hidden test inputs: negatives, zero and values beyond the shown examples (0-9), so an
# expression that only fits the examples fails.
HIDDEN_INPUTS = (-8, -3, 0, 5, 11, 20)

# Marks the harness's result lines among whatever else the expression prints.
_MARK = "@@test "

# Runs in the sandbox: reads {"expression", "inputs", "test_timeout_s"} from stdin and
# prints one marked JSON line per input, each right after its evaluation (so the results
# before a hang survive the kill). A per-test alarm stops slow Python-level evaluation;
# the sandbox's wall-clock timeout stops the rest.
_HARNESS = r"""
import builtins, json, signal, sys


class TestTimeout(Exception):
    pass


def describe(value):
    if type(value) is int:
        try:
            return {"int": str(value)}
        except ValueError:
            return {"other": "an int too large to print"}
    if type(value) is float:
        return {"float": repr(value)}
    try:
        shown = repr(value)[:60]
    except Exception:
        shown = "?"
    return {"other": f"{type(value).__name__} {shown}"}


def main():
    job = json.loads(sys.stdin.read())
    limit_s = job["test_timeout_s"]

    def on_alarm(signum, frame):
        raise TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    try:
        code, compile_error = compile(job["expression"], "<response>", "eval"), None
    except (SyntaxError, ValueError) as error:
        code, compile_error = None, f"{type(error).__name__}: {error}"
    for test, x in enumerate(job["inputs"]):
        if code is None:
            report = {"error": compile_error}
        else:
            signal.setitimer(signal.ITIMER_REAL, limit_s)
            try:
                value = eval(code, {"__builtins__": builtins}, {"x": x})
            except TestTimeout:
                report = {"timeout": f"no result within {limit_s} s"}
            except Exception as error:
                report = {"error": f"{type(error).__name__}: {error}"[:160]}
            else:
                report = None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if report is None:
                report = describe(value)
        print(MARK + json.dumps({"test": test, **report}), flush=True)


main()
""".replace("MARK", repr(_MARK))


def canonical_forms(a: int, b: int) -> tuple[str, ...]:
    """The expressions of a*x+b that the oracle knows: the term first ("2*x+3") and, when
    b != 0, the constant first ("3+2*x"), with signs folded in ("-x-3", "3-2*x").

    Other correct expressions ("x*2+3") pass verification; the oracle steers toward these.
    """
    term = {1: "x", -1: "-x"}.get(a, f"{a}*x")
    if b == 0:
        return (term,)
    return (f"{term}{b:+d}", f"{b}{term}" if term.startswith("-") else f"{b}+{term}")


def _passes(record: dict | None, expected: int) -> bool:
    # Ints and floats count by value (2.0*x+3 gives 7.0 for x=2); anything else fails.
    if record is None:
        return False
    # The record may be forged: the expression can print a line for a later test and exit
    # before the harness writes the real one. A value that does not parse fails the test
    # instead of raising in the trainer.
    try:
        if "int" in record:
            return int(record["int"]) == expected
        if "float" in record:
            return float(record["float"]) == expected
    except (TypeError, ValueError):
        return False
    return False


def _results(stdout: str) -> dict[int, dict]:
    """The harness's records by test index. A test's last record wins: the harness prints
    after the expression has run, so its line follows anything the expression printed."""
    results = {}
    for line in stdout.splitlines():
        if not line.startswith(_MARK):
            continue
        try:
            record = json.loads(line[len(_MARK) :])
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("test"), int):
            results[record["test"]] = record
    return results


def _stop_reason(run: RunResult) -> str:
    if run.killed_reason is not None:
        return run.killed_reason
    if run.output_truncated:
        # The harness's result lines come after the program's own output: past the
        # sandbox's output limit they were dropped, whatever the answers were.
        return "it printed more than the sandbox keeps, and the test results were cut off"
    last = run.stderr.strip().splitlines()[-1:]
    if run.returncode == 0 or not last:
        return f"it exited early with code {run.returncode}"
    return f"exit code {run.returncode}: {last[0][:160]}"


@register_task
class Program(Task):
    """Find f(x) = a*x + b from examples: a in [-max_coef, max_coef] without 0, b in
    [-max_const, max_const]; the shown inputs are distinct values in 0-9.

    Options:
        max_coef: largest |a|, 1 to 99 (default 5).
        max_const: largest |b|, 0 to 999 (default 9).
        examples: how many values the prompt shows, 2 to 10 (default 3; two determine f).
        timeout_s: wall-clock limit of one sandboxed verification (default 2.0).
        test_timeout_s: limit for one test's evaluation inside it (default 0.2).

    Reward: the fraction of the len(HIDDEN_INPUTS) hidden tests passed (partial credit for
    an expression right on some inputs); correct iff all pass.
    Oracle: the canonical forms (`canonical_forms`) each equally likely; for a prefix no
    form continues, the forms sharing the longest prefix with it, at the student's
    position (their character there, END past their length).
    Train and eval split by the function (a, b): eval functions are never trained on.
    """

    name = "program"

    def __init__(
        self,
        *,
        max_coef: int = 5,
        max_const: int = 9,
        examples: int = 3,
        timeout_s: float = 2.0,
        test_timeout_s: float = 0.2,
    ):
        for option, value, low, high in (
            ("max_coef", max_coef, 1, 99),
            ("max_const", max_const, 0, 999),
            ("examples", examples, 2, 10),
        ):
            if not (isinstance(value, int) and low <= value <= high):
                raise ValueError(f"program: {option} must be an int in [{low}, {high}], got {value!r}")
        for option, value in (("timeout_s", timeout_s), ("test_timeout_s", test_timeout_s)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise ValueError(f"program: {option} must be a positive finite number, got {value!r}")
        self.max_coef, self.max_const, self.examples = max_coef, max_const, examples
        self.timeout_s, self.test_timeout_s = float(timeout_s), float(test_timeout_s)
        longest = max(len(form) for form in canonical_forms(-max_coef, -max_const))
        # Room for a longer equivalent expression ("x*2+3+0") than the canonical forms.
        self.max_response_chars = longest + 8

    def problems(self, n: int, *, seed: int, split: str = "train") -> list[Problem]:
        coefs = [a for a in range(-self.max_coef, self.max_coef + 1) if a != 0]

        def draw(rng):
            a, b = rng.choice(coefs), rng.randint(-self.max_const, self.max_const)
            shown = sorted(rng.sample(range(10), self.examples))
            prompt = " ".join(f"f({x})={a * x + b}" for x in shown) + " f(x)="
            meta = {
                "a": a,
                "b": b,
                "examples": tuple((x, a * x + b) for x in shown),
                "tests": tuple((x, a * x + b) for x in HIDDEN_INPUTS),
            }
            return f"{a},{b}", Problem(prompt=prompt, solution=canonical_forms(a, b)[0], meta=meta)

        return sample_problems(self.name, n, seed, split, draw)

    def verify(self, problem: Problem, response: str) -> Feedback:
        return self.verify_batch([problem], [response])[0]

    def verify_batch(self, problems, responses) -> list[Feedback]:
        """Each response runs in its own sandboxed process (one response cannot affect
        another's results), several at a time."""
        check_batch(problems, responses)
        jobs = [
            json.dumps(
                {
                    "expression": response,
                    "inputs": [x for x, _ in problem.meta["tests"]],
                    "test_timeout_s": self.test_timeout_s,
                }
            )
            for problem, response in zip(problems, responses)
        ]
        runs = run_many([_HARNESS] * len(jobs), stdins=jobs, timeout_s=self.timeout_s)
        return [self._feedback(p, r, run) for p, r, run in zip(problems, responses, runs)]

    def oracle(self, problem: Problem, prefix: str) -> dict[str, float]:
        return oracle_from_answers(canonical_forms(problem.meta["a"], problem.meta["b"]), prefix)

    def _feedback(self, problem: Problem, response: str, run: RunResult) -> Feedback:
        tests = problem.meta["tests"]
        results = _results(run.stdout)
        passed = [_passes(results.get(i), expected) for i, (_, expected) in enumerate(tests)]
        lines = [f"f(x) = {show_text(response)} on {len(tests)} hidden tests: {sum(passed)} passed"]
        first_failure = passed.index(False) if not all(passed) else None
        for i, (x, expected) in enumerate(tests):
            record = results.get(i)
            if record is None:
                got = f"no result (the program stopped: {_stop_reason(run)})"
            elif "int" in record or "float" in record:
                got = f"got {record.get('int', record.get('float'))}"
            elif "error" in record:
                got = f"raised {record['error']}"
            elif "timeout" in record:
                got = f"timed out ({record['timeout']})"
            else:
                got = f"got {record.get('other', '?')}"
            line = f"test {i + 1}: f({x}) expected {expected}, {got}: {'pass' if passed[i] else 'fail'}"
            if i == first_failure:
                line += " <- first failing test"
            lines.append(to_printable(line))
        correct = all(passed)
        return Feedback(reward=sum(passed) / len(tests), correct=correct, text="\n".join(lines))
