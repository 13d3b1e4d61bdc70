"""Experts: black boxes that give a sparse next-token distribution at every state a
student rollout visited, as a `SparseTarget` [B, T, k].

- `OracleExpert`: the task's own program (`Task.oracle`): a distribution over the
  characters that keep the student's prefix on a path to a correct answer.
- `ModelExpert`: a causal LM conditioned on the prompt, the student's attempt and the
  task's feedback, reading the student's response token by token; its top-k comes from
  `linear_topk` on its hidden states (no [tokens x vocab] logits). The LM may be the
  student itself (frozen: its current weights, or an EMA of them) or another model
  sharing the student's tokenizer.
- `NoisyExpert`: wraps an expert and, with probability eps per state, replaces its
  distribution by a one-hot on a uniformly random token (an imperfect teacher). The
  noise is keyed by (run seed, step, row of the step's batch, position), as the
  rollouts are: no stream to checkpoint, and a rank's share gets the noise a single
  process would give the same rows.

Slots an expert does not use hold `IGNORE_INDEX` with probability 0.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from distil_kernels import SparseTarget, linear_topk
from distil_kernels.sampling.philox import philox4x32, seed_key

from .model import LanguageModel
from .rollout import Rollouts, encode_prompts, row_seeds, visited_states
from .tasks import END, Feedback, Problem, Task
from .tokenizer import check_same_vocabulary

IGNORE_INDEX = -100

# What a model expert reads before the student's response: the task's feedback on the
# attempt, then the prompt again, so its next-token distribution is a corrected answer.
FEEDBACK_TEMPLATE = "{prompt}{attempt}\nfeedback: {feedback}\nanswer again: {prompt}"


@dataclass
class ExpertQuery:
    """What an expert sees: the problems, the student's rollouts and the task's feedback."""

    problems: list[Problem]  # one per rollout
    rollouts: Rollouts
    feedback: list[Feedback]  # one per rollout
    step: int = 0  # the training step the rollouts belong to
    row_offset: int = 0  # the first rollout's row in the step's whole batch (a rank's share)


class Expert(ABC):
    name: str

    @abstractmethod
    def targets(self, query: ExpertQuery) -> SparseTarget:
        """SparseTarget [B, T, k] over the student's vocabulary at every visited state."""

    def after_update(self, student: LanguageModel) -> None:
        """Called after each optimizer step (EMA experts track the student here)."""
        return None


class OracleExpert(Expert):
    """The task's program as an expert, speaking the student's character tokens."""

    name = "oracle"

    def __init__(self, task: Task, student: LanguageModel):
        if not getattr(student.tokenizer, "single_characters", False):
            raise ValueError(
                f"the oracle expert of task {task.name!r} gives characters, and the student's tokenizer "
                f"({student.tokenizer.fingerprint}) is not one token per character; use --expert self "
                f"(or model:PATH) with this student, or the built-in student"
            )
        self.task = task
        self.tokenizer = student.tokenizer

    def targets(self, query: ExpertQuery) -> SparseTarget:
        actions = query.rollouts.actions.cpu()
        mask = query.rollouts.mask.cpu()
        rows, steps = actions.shape
        dists: dict[tuple[int, int], dict[int, float]] = {}
        for b in range(rows):
            prefix_ids: list[int] = []
            for t in range(steps):
                if not mask[b, t]:
                    break
                prefix = self.tokenizer.decode(prefix_ids)
                dist = self.task.oracle(query.problems[b], prefix)
                dists[b, t] = {self.tokenizer.eos_id if c == END else self.tokenizer.token(c): p
                               for c, p in dist.items()}
                prefix_ids.append(int(actions[b, t]))
        k = max((len(d) for d in dists.values()), default=1)
        ids = torch.full((rows, steps, k), IGNORE_INDEX, dtype=torch.int64)
        probs = torch.zeros(rows, steps, k)
        for (b, t), dist in dists.items():
            for j, (token, p) in enumerate(sorted(dist.items(), key=lambda kv: -kv[1])):
                ids[b, t, j] = token
                probs[b, t, j] = p
        device = query.rollouts.actions.device
        return SparseTarget(ids.to(device), probs.to(device))


class ModelExpert(Expert):
    """A causal LM that reads the feedback, then scores the student's response.

    `lm=None` makes the student its own expert (self-distillation): its current weights,
    frozen per query, or with `ema` an exponential moving average of them.
    """

    def __init__(self, student: LanguageModel, lm: LanguageModel | None = None, *, top_k: int = 16,
                 ema: float | None = None, backend: str = "auto"):
        if lm is not None:
            check_same_vocabulary(student.tokenizer, lm.tokenizer)
        if ema is not None and not 0.0 < ema < 1.0:
            raise ValueError(f"ema must be in (0, 1) or None, got {ema}")
        if ema is not None and lm is not None:
            raise ValueError("ema applies to the student as its own expert (lm=None), not to another model")
        self.name = "self" if lm is None else "model"
        self.student = student
        self.ema = ema
        self.lm = LanguageModel(copy.deepcopy(student.model), student.tokenizer) if ema is not None else lm
        if self.lm is not None:
            self.lm.model.requires_grad_(False)
        self.top_k = top_k
        self.backend = backend

    def contexts(self, query: ExpertQuery) -> list[str]:
        return [FEEDBACK_TEMPLATE.format(prompt=p.prompt, attempt=text, feedback=f.text)
                for p, text, f in zip(query.problems, query.rollouts.texts, query.feedback)]

    @torch.no_grad()
    def targets(self, query: ExpertQuery) -> SparseTarget:
        lm = self.lm if self.lm is not None else self.student
        r = query.rollouts
        prompt_ids, prompt_mask = encode_prompts(lm, self.contexts(query))
        was_training = lm.model.training
        lm.model.eval()
        states = visited_states(lm, prompt_ids, prompt_mask, r.actions, r.mask)
        lm.model.train(was_training)
        head = lm.head
        k = min(self.top_k, head.weight.shape[0])
        top = linear_topk(states[r.mask], head.weight, k, bias=head.bias, softcap=head.softcap, backend=self.backend)
        ids = torch.full((*r.actions.shape, k), IGNORE_INDEX, dtype=torch.int64, device=r.actions.device)
        probs = torch.zeros(*r.actions.shape, k, device=r.actions.device)
        ids[r.mask] = top.ids
        probs[r.mask] = top.logprobs.exp()
        return SparseTarget(ids, probs)

    @torch.no_grad()
    def after_update(self, student: LanguageModel) -> None:
        if self.ema is None:
            return
        for mine, theirs in zip(self.lm.model.parameters(), student.model.parameters()):
            mine.lerp_(theirs.detach(), 1.0 - self.ema)


class NoisyExpert(Expert):
    """With probability `eps` per state, a one-hot on a uniformly random token instead."""

    def __init__(self, inner: Expert, eps: float, vocab_ids: Tensor, seed: int):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"noise eps must be in [0, 1], got {eps}")
        self.inner = inner
        self.eps = eps
        self.vocab_ids = vocab_ids
        self.seed = seed
        self.name = f"noisy({inner.name},{eps})"

    def noise(self, query: ExpertQuery, steps: int) -> tuple[Tensor, Tensor]:
        """(corrupt [B, T] bool, random ids [B, T]): two Philox words per (row, position).

        Words, not a generator's stream: a row's noise at a position is the same however
        the batch is padded or split across ranks, and a resumed run draws it again.
        """
        rows = row_seeds(self.seed, query.step, len(query.problems), torch.device("cpu"), query.row_offset,
                         purpose="expert-noise")
        k0, k1 = seed_key(rows[:, None])
        word_corrupt, word_id, _, _ = philox4x32(torch.arange(steps)[None, :], 0, 0, 0, k0, k1)
        corrupt = word_corrupt.double() < self.eps * 2.0**32  # uniform in [0, 2**32): eps 1 corrupts all
        return corrupt, (word_id * len(self.vocab_ids)) >> 32

    def targets(self, query: ExpertQuery) -> SparseTarget:
        clean = self.inner.targets(query)
        shape = clean.ids.shape[:-1]
        corrupt, index = self.noise(query, shape[1])
        corrupt = corrupt.to(clean.ids.device)
        random_ids = self.vocab_ids[index]
        one_hot_ids = torch.full_like(clean.ids, IGNORE_INDEX)
        one_hot_ids[..., 0] = random_ids.to(clean.ids.device)
        one_hot_probs = torch.zeros_like(clean.probs)
        one_hot_probs[..., 0] = 1.0
        keep = ~corrupt[..., None]
        return SparseTarget(torch.where(keep, clean.ids, one_hot_ids), torch.where(keep, clean.probs, one_hot_probs))

    def after_update(self, student: LanguageModel) -> None:
        self.inner.after_update(student)


def make_expert(spec: str, *, task: Task, student: LanguageModel, noise: float, seed: int, top_k: int,
                device: torch.device, backend: str = "auto") -> Expert:
    """`oracle`, `self`, `ema:<decay>` or `model:<path>`, optionally wrapped in noise."""
    from .model import load_model

    if spec == "oracle":
        expert: Expert = OracleExpert(task, student)
    elif spec == "self":
        expert = ModelExpert(student, top_k=top_k, backend=backend)
    elif spec.startswith("ema:"):
        try:
            decay = float(spec[4:])
        except ValueError:
            raise ValueError(f"expert 'ema:<decay>' needs a number in (0, 1) after 'ema:', got {spec!r}") from None
        expert = ModelExpert(student, top_k=top_k, ema=decay, backend=backend)
    elif spec.startswith("model:"):
        other = load_model(spec[6:], device, what="--expert model:")
        expert = ModelExpert(student, other, top_k=top_k, backend=backend)
    else:
        raise ValueError(f"expert must be 'oracle', 'self', 'ema:<decay>' or 'model:<path>', got {spec!r}")
    if noise > 0.0:
        tok = student.tokenizer
        specials = {tok.pad_id, tok.bos_id}
        vocab_ids = torch.tensor([i for i in range(tok.vocab_size) if i not in specials])
        expert = NoisyExpert(expert, noise, vocab_ids, seed)
    return expert
