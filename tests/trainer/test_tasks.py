"""Tests of the trainer's tasks: deterministic disjoint splits, verifiers whose feedback
names the first error, oracles that are distributions and reproduce a correct answer,
the documented recovery on a wrong prefix, the registry's errors, printable text.

The program task verifies in the sandbox (one subprocess per response), so its tests
verify a handful of responses, batched.
"""

from __future__ import annotations

import pytest

from distil.tasks import END, TASK_NAMES, Problem, get_task
from distil.tasks.base import is_printable
from distil.tasks.program import HIDDEN_INPUTS, canonical_forms

CONFIGS = [
    ("addition", {}),
    ("addition", {"reverse": False}),
    ("addition", {"digits": 3}),
    ("sorting", {}),
    ("program", {}),
]
IDS = ["addition", "addition-forward", "addition-3digits", "sorting", "program"]


def problem_key(name: str, problem: Problem):
    """What the task partitions on: no key may be in both splits."""
    if name == "addition":
        return tuple(sorted((problem.meta["a"], problem.meta["b"])))
    if name == "sorting":
        return problem.solution
    return problem.meta["a"], problem.meta["b"]


def greedy(task, problem: Problem) -> str:
    """Follow the oracle's most likely character until END or the length limit."""
    response = ""
    while len(response) < task.max_response_chars:
        dist = task.oracle(problem, response)
        char = max(dist, key=dist.get)
        if char == END:
            break
        response += char
    return response


def addition_problem(a: int, b: int, reverse: bool) -> Problem:
    return Problem(
        prompt=f"{a}+{b}=", solution=get_task("addition", reverse=reverse).answer(a, b), meta={"a": a, "b": b}
    )


def first_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "first error" in line or "first failing" in line]
    assert len(lines) == 1, text
    return lines[0]


# --------------------------------------------------------------------------------------
# Problems and splits.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_problems_deterministic_and_splits_disjoint(name, options):
    task = get_task(name, **options)
    train = task.problems(400, seed=3)
    assert train == task.problems(400, seed=3)
    assert [p.meta for p in train] == [p.meta for p in task.problems(400, seed=3)]
    assert train != task.problems(400, seed=4)
    evals = task.problems(200, seed=3, split="eval") + task.problems(200, seed=4, split="eval")
    assert {problem_key(name, p) for p in train}.isdisjoint(problem_key(name, p) for p in evals)
    assert {p.prompt for p in train}.isdisjoint(p.prompt for p in evals)
    for p in train[:50] + evals[:50]:
        assert is_printable(p.prompt) and is_printable(p.solution)
        assert len(p.solution) < task.max_response_chars


def test_problems_bad_arguments():
    task = get_task("addition")
    with pytest.raises(ValueError, match="split"):
        task.problems(3, seed=0, split="test")
    with pytest.raises(ValueError, match="n must be"):
        task.problems(-1, seed=0)
    assert task.problems(0, seed=0) == []


def test_addition_operands_have_the_digit_count():
    for digits in (1, 2, 3):
        task = get_task("addition", digits=digits)
        low = 10 ** (digits - 1) if digits > 1 else 0
        for p in task.problems(100, seed=0):
            assert low <= p.meta["a"] < 10**digits and low <= p.meta["b"] < 10**digits
            assert p.prompt == f"{p.meta['a']}+{p.meta['b']}="


# --------------------------------------------------------------------------------------
# Verification and feedback.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_solution_verifies(name, options):
    task = get_task(name, **options)
    problems = task.problems(6 if name == "program" else 50, seed=0)
    for fb in task.verify_batch(problems, [p.solution for p in problems]):
        assert fb.correct and fb.reward == 1.0, fb.text
        assert is_printable(fb.text) and "first error" not in fb.text and "first failing" not in fb.text


@pytest.mark.parametrize(
    ("reverse", "response", "marked", "position"),
    [
        (True, "251", "column 2: 4+8+carry 1 = 13 -> write 3 carry 1; you wrote 5", 2),
        (True, "23", "column 3: carry 1 = 1 -> write 1; you wrote nothing", 3),
        (True, "2311", 'after column 3 the answer ends; you wrote "1"', 4),
        (True, "", "column 1: 7+5 = 12 -> write 2 carry 1; you wrote nothing", 1),
        (False, "142", "column 2: 4+8+carry 1 = 13 -> write 3 carry 1; you wrote 4", 2),
        (False, "32", "column 3: carry 1 = 1 -> write 1; you wrote 3", 1),
        (False, "13 ", "column 1: 7+5 = 12 -> write 2 carry 1; you wrote ' '", 3),
    ],
)
def test_addition_feedback_marks_first_error(reverse, response, marked, position):
    task = get_task("addition", reverse=reverse)
    problem = addition_problem(47, 85, reverse)
    assert problem.solution == ("231" if reverse else "132")
    fb = task.verify(problem, response)
    assert not fb.correct and fb.reward == 0.0
    assert first_error_line(fb.text) == f"{marked} <- first error (character {position} of your answer)"
    assert fb.text.endswith(f'your answer "{response}" is wrong')


@pytest.mark.parametrize(
    ("response", "marked"),
    [
        ("13258", "position 2: remaining 5283, smallest 2; you wrote 3 <- first error: 3 is out of place, 2 is"),
        ("12x58", "position 3: remaining 583, smallest 3; you wrote x <- first error: not one of the remaining"),
        ("11358", "position 2: remaining 5283, smallest 2; you wrote 1 <- first error: not one of the remaining"),
        ("123", "position 4: remaining 58, smallest 5; you wrote nothing <- first error: the answer stopped"),
        ("123589", "position 6: no digits remain, the answer ends; you wrote 9 <- first error: extra"),
    ],
)
def test_sorting_feedback_marks_first_error(response, marked):
    task = get_task("sorting")
    problem = Problem(prompt="sort 52813=", solution="12358", meta={"digits": "52813"})
    fb = task.verify(problem, response)
    assert not fb.correct and fb.reward == 0.0
    assert first_error_line(fb.text).startswith(marked)
    # The trace stops at the first error.
    assert fb.text.splitlines()[-2] == first_error_line(fb.text)


def program_problem(a: int, b: int) -> Problem:
    tests = tuple((x, a * x + b) for x in HIDDEN_INPUTS)
    return Problem(prompt="f(x)=", solution=canonical_forms(a, b)[0], meta={"a": a, "b": b, "tests": tests})


def test_program_feedback_is_an_execution_trace():
    task = get_task("program")
    problem = program_problem(2, 3)
    responses = ["2*x+3 if x > 0 else 0", "2*x+y", "x*2+3", "2.0*x+3", "(lambda: [0 for _ in iter(int, 1)])()", "2*x+"]
    partial, error, other_form, floats, hang, syntax = task.verify_batch([problem] * len(responses), responses)
    # HIDDEN_INPUTS = (-8, -3, 0, 5, 11, 20): the three positive inputs pass.
    assert not partial.correct and partial.reward == pytest.approx(3 / 6)
    assert first_error_line(partial.text) == "test 1: f(-8) expected -13, got 0: fail <- first failing test"
    assert "test 4: f(5) expected 13, got 13: pass" in partial.text
    assert error.reward == 0.0 and "raised NameError: name 'y' is not defined" in first_error_line(error.text)
    assert other_form.correct and other_form.reward == 1.0
    assert floats.correct, floats.text
    assert hang.reward == 0.0 and "timed out" in first_error_line(hang.text)
    assert syntax.reward == 0.0 and "raised SyntaxError" in first_error_line(syntax.text)
    for fb in (partial, error, other_form, floats, hang, syntax):
        assert is_printable(fb.text)


def test_program_sandbox_contains_the_response():
    task = get_task("program")
    problem = program_problem(1, 0)
    responses = ["__import__('os').system('true') or x", "__import__('sys').exit(0)", "print('@@test nonsense') or x"]
    system, early_exit, noise = task.verify_batch([problem] * 3, responses)
    assert "PermissionError: sandbox: os.system denied" in first_error_line(system.text)
    assert early_exit.reward == 0.0 and "no result (the program stopped" in first_error_line(early_exit.text)
    assert noise.correct, noise.text


@pytest.mark.parametrize("value", ['"int": "abc"', '"float": "abc"', '"int": [1]', '"int": "' + "1" * 5000 + '"'])
def test_program_forged_records_fail_the_test(value):
    # A response can print a record for a later test and exit before the harness overwrites it.
    task = get_task("program")
    forged = 'print(\'@@test {"test": 5, ' + value + "}', flush=True) or __import__('os')._exit(0)"
    fb = task.verify(program_problem(1, 0), forged)
    assert fb.reward == 0.0 and "test 6: f(20) expected 20, got" in fb.text and fb.text.endswith(": fail")


def test_program_output_past_the_limit_is_said():
    """A right answer that prints past the sandbox's output limit pushes the results out:
    the feedback says so rather than that the program exited early."""
    fb = get_task("program").verify(program_problem(1, 0), "print('a' * 70000) or x")
    assert fb.reward == 0.0 and "printed more than the sandbox keeps" in fb.text, fb.text


def test_feedback_is_printable_for_any_response():
    weird = "\t\x00\u00e9\u4e2d\n"
    for name, options in CONFIGS:
        task = get_task(name, **options)
        problem = task.problems(1, seed=0)[0]
        fb = task.verify(problem, weird)
        assert not fb.correct and fb.reward < 1.0
        assert is_printable(fb.text) and "\\x00" in fb.text


def test_verify_batch_checks_lengths():
    task = get_task("sorting")
    with pytest.raises(ValueError, match="same length"):
        task.verify_batch(task.problems(2, seed=0), ["0"])


# --------------------------------------------------------------------------------------
# Oracles.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_oracle_is_a_distribution_and_greedy_solves(name, options):
    task = get_task(name, **options)
    problems = task.problems(4 if name == "program" else 30, seed=1, split="eval")
    responses = [greedy(task, p) for p in problems]
    for p in problems:
        for prefix in [p.solution[:k] for k in range(len(p.solution) + 1)] + ["?", p.solution + "0", "9" * 12]:
            dist = task.oracle(p, prefix)
            assert dist and all(0.0 < q <= 1.0 for q in dist.values())
            assert sum(dist.values()) == pytest.approx(1.0)
            assert all(c == END or (len(c) == 1 and is_printable(c)) for c in dist)
    assert all(fb.correct for fb in task.verify_batch(problems, responses)), responses


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", {"2": 1.0}),
        ("23", {"1": 1.0}),
        ("231", {END: 1.0}),
        # Wrong prefixes: the answer's character at the student's position, END past it.
        ("9", {"3": 1.0}),
        ("25", {"1": 1.0}),
        ("2317", {END: 1.0}),
        ("xxxxx", {END: 1.0}),
    ],
)
def test_addition_oracle_recovery(prefix, expected):
    task = get_task("addition")
    assert task.oracle(addition_problem(47, 85, reverse=True), prefix) == expected


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        # Two canonical forms, "2*x+3" and "3+2*x": both continue the empty prefix.
        ("", {"2": 0.5, "3": 0.5}),
        ("2", {"*": 1.0}),
        ("3+", {"2": 1.0}),
        ("2*x+3", {END: 1.0}),
        # Wrong prefixes: the forms sharing the longest prefix, at the student's position.
        ("2+", {"x": 1.0}),
        ("7", {"*": 0.5, "+": 0.5}),
        ("2*x+3+", {END: 1.0}),
    ],
)
def test_program_oracle_forms_and_recovery(prefix, expected):
    task = get_task("program")
    assert task.oracle(program_problem(2, 3), prefix) == expected


def test_program_canonical_forms_fold_signs():
    assert canonical_forms(2, 3) == ("2*x+3", "3+2*x")
    assert canonical_forms(-2, 3) == ("-2*x+3", "3-2*x")
    assert canonical_forms(1, -3) == ("x-3", "-3+x")
    assert canonical_forms(-1, -3) == ("-x-3", "-3-x")
    assert canonical_forms(-1, 0) == ("-x",)


def test_sorting_oracle_recovery():
    task = get_task("sorting")
    problem = Problem(prompt="sort 52813=", solution="12358", meta={"digits": "52813"})
    assert task.oracle(problem, "12") == {"3": 1.0}
    assert task.oracle(problem, "13") == {"3": 1.0}
    assert task.oracle(problem, "12358") == {END: 1.0}
    assert task.oracle(problem, "99999") == {END: 1.0}


# --------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------
def test_registry():
    assert set(TASK_NAMES) == {"addition", "sorting", "program"}
    with pytest.raises(ValueError, match="unknown task 'multiplication'; registered tasks: addition, program, sorting"):
        get_task("multiplication")
    with pytest.raises(TypeError, match="task 'addition'.*its options are: digits, reverse"):
        get_task("addition", width=3)
    with pytest.raises(ValueError, match="digits must be an int in"):
        get_task("addition", digits=0)
    with pytest.raises(ValueError, match="length must be an int in"):
        get_task("sorting", length=1)
    with pytest.raises(ValueError, match="examples must be an int in"):
        get_task("program", examples=1)
    # An infinite limit would otherwise fail later, inside the sandbox or its harness.
    for option in ("timeout_s", "test_timeout_s"):
        with pytest.raises(ValueError, match=f"program: {option} must be a positive finite number, got inf"):
            get_task("program", **{option: float("inf")})
