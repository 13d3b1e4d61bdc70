"""The trainer's tasks: problems, verifiers with rich feedback, and the task as an oracle.

    from distil.tasks import get_task
    task = get_task("addition", digits=2)
    problem = task.problems(1, seed=0)[0]
    task.verify(problem, "231").text   # the column-by-column trace
    task.oracle(problem, "2")          # {"3": 1.0}: the next character after "2"

The interface is in `base`; importing this package registers the built-in tasks
(addition, sorting, program).
"""

from . import arithmetic, program, sorting  # noqa: F401  (registers the tasks)
from .base import END, Feedback, Problem, Task, get_task, register_task, task_names

# The names registered at import; `get_task` also knows tasks registered later.
TASK_NAMES = task_names()

__all__ = ["END", "TASK_NAMES", "Feedback", "Problem", "Task", "get_task", "register_task"]
