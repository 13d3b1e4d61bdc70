"""The DistIL training loop: sample rollouts, get feedback and expert targets, update.

One step: `prompts_per_step` training prompts (a deterministic function of the run seed
and the step), `rollouts_per_prompt` responses each by `linear_sample`, the task's
verifier for rewards and feedback text, the expert's sparse targets at every visited
state, then the objective's loss on the student's recomputed hidden states and one
AdamW step. A short supervised warm start on the tasks' reference solutions comes first
(teacher forcing, ordinary cross-entropy), so RL starts from a weak but non-zero policy.

Outputs in `out`: `metrics.jsonl` (one row per step), `checkpoint/` (model, optimizer,
expert and loop state; written atomically), `summary.json` and `curves.png` at the end.
A run resumed from its checkpoint continues exactly as if it had not stopped: every
random choice is a function of (seed, step) or lives in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distil_kernels import SparseTarget, linear_cross_entropy
from distil_kernels.backends import BACKENDS
from distil_kernels.loss.distil_loss import BASELINES

from .distributed import DistContext, wrap_states
from .evaluate import evaluate
from .experts import Expert, ExpertQuery, ModelExpert, NoisyExpert, make_expert
from .model import LanguageModel, TinyConfig, load_model, tiny_student
from .objectives import Batch, Distil, Objective, make_objective
from .rollout import SamplingConfig, sample_rollouts, teacher_forced
from .tasks import Task, get_task


@dataclass
class TrainConfig:
    task: str = "addition"
    task_options: dict[str, Any] = field(default_factory=dict)
    objective: str = "distil"
    expert: str = "oracle"  # oracle | self | ema:<decay> | model:<path>
    expert_top_k: int = 16
    noise: float = 0.0  # probability that the expert's answer at a state is replaced by a random token
    steps: int = 500
    seed: int = 0
    out: str = "runs/distil"
    model: str | None = None  # a local transformers causal LM; None: the built-in tiny student
    student_hidden: int = 128  # the built-in student's width and depth
    student_layers: int = 3
    device: str = "cpu"
    backend: str = "auto"
    prompts_per_step: int = 32
    rollouts_per_prompt: int = 2
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    warmup_steps: int = 400  # supervised steps on reference solutions before RL
    warmup_batch: int = 32
    warmup_lr: float = 1e-3
    eval_every: int = 50
    eval_prompts: int = 64
    eval_samples: int = 4
    # Rollouts' sampling. The objectives score actions under the untempered, untruncated
    # policy, so other values make the future-credit and GRPO terms off-policy.
    temperature: float = 1.0
    top_p: float | None = None
    checkpoint_every: int = 25
    future_credit: float = 1.0
    discount: float = 1.0
    baseline: str = "group"

    def __post_init__(self) -> None:
        self._check_types()
        if not -(2**63) <= self.seed < 2**64:  # what torch.manual_seed takes
            raise ValueError(f"seed must be an int in [-2**63, 2**64), got {self.seed!r}")
        positive = ("steps", "prompts_per_step", "rollouts_per_prompt", "eval_every", "eval_prompts",
                    "eval_samples", "checkpoint_every", "expert_top_k", "warmup_batch", "student_hidden",
                    "student_layers")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.student_hidden % 8:  # 4 heads of an even width (rotary embeddings pair the dimensions)
            raise ValueError(f"student_hidden must be a multiple of 8, got {self.student_hidden!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0 or not self.warmup_lr > 0:
            raise ValueError(f"lr and warmup_lr must be > 0, got {self.lr}, {self.warmup_lr}")
        # Checked here, not where first used: the sampler and the loss would refuse these
        # only after the warm start, with a traceback; a negative noise or a zero clip norm
        # would not be refused at all (no noise; every update scaled to zero).
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if not math.isfinite(self.future_credit):
            raise ValueError(f"future_credit must be finite, got {self.future_credit!r}")
        if not self.discount >= 0:
            raise ValueError(f"discount must be >= 0, got {self.discount!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {', '.join(('auto', *BACKENDS))}, got {self.backend!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device; use --device cpu")

    def _check_types(self) -> None:
        """Every option of the type its field names (a config file can give any TOML value):
        a bool is not a number here (`noise = true` would otherwise train at noise 1), an
        int is a float (converted), a string is not a number."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            optional = kind.endswith("| None")
            base = kind.removesuffix("| None").strip().split("[")[0]
            if value is None and optional:
                continue
            if base == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            expected = {"str": str, "int": int, "float": float, "dict": dict}[base]
            if isinstance(value, bool) or not isinstance(value, expected):
                name = {"str": "a string", "int": "an int", "float": "a number", "dict": "a table"}[base]
                raise TypeError(f"{f.name} must be {name}{' or None' if optional else ''}, got {value!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


# What a resumed run may set otherwise than the run it continues: the length, where it
# runs, and how often it saves. Anything else would not continue that run, but start
# another from its weights.
RESUME_MAY_CHANGE = ("steps", "out", "device", "backend", "checkpoint_every")


def find_checkpoint(out: str | Path) -> Path | None:
    """The run's checkpoint directory in `out` (checkpoint/, or checkpoint.old/ when a kill
    fell between the two renames of a save), or None."""
    for name in ("checkpoint", "checkpoint.old"):
        if (Path(out) / name / "state.json").exists():
            return Path(out) / name
    return None


def saved_config(out: str | Path) -> dict[str, Any]:
    """The training options of the checkpoint in `out`; a ValueError naming `out` when there
    is none or it cannot be read."""
    directory = find_checkpoint(out)
    if directory is None:
        raise ValueError(f"--resume: no checkpoint in {out} (expected {Path(out) / 'checkpoint' / 'state.json'}); "
                         f"give the --out of the run to continue")
    try:
        config = json.loads((directory / "state.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume: cannot read {directory / 'state.json'}: {err}") from None
    if not isinstance(config, dict):
        raise TypeError(f"--resume: {directory / 'state.json'} holds no training options")
    return config


def _step_seed(seed: int, step: int, purpose: str) -> int:
    digest = hashlib.blake2b(f"distil:{purpose}:{seed}:{step}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def build_objective(config: TrainConfig) -> Objective:
    if config.objective == "distil":
        return Distil(config.future_credit, config.discount, config.baseline)
    return make_objective(config.objective)


class Trainer:
    def __init__(self, config: TrainConfig, *, progress: bool = True, log=print):
        self.config = c = config
        # Under torchrun: this rank's place (distil/distributed.py); a single process otherwise.
        self.dist = DistContext.from_env(config.device)
        for name in ("prompts_per_step", "warmup_batch"):
            if getattr(config, name) < self.dist.world:
                raise ValueError(f"{name} ({getattr(config, name)}) must be at least the number of ranks "
                                 f"({self.dist.world}): every rank takes a share")
        self.progress = progress and self.dist.main
        self.log = log if self.dist.main else (lambda *args, **kwargs: None)
        self.out = Path(config.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out {config.out!r} exists and is not a directory")
        self.device = self.dist.device(config.device)
        self.task: Task = get_task(config.task, **config.task_options)
        torch.manual_seed(config.seed)
        if config.model is None:
            size = TinyConfig(hidden_size=c.student_hidden, intermediate_size=3 * c.student_hidden,
                              num_hidden_layers=c.student_layers)
            self.lm: LanguageModel = tiny_student(config.seed, self.device, size)
        else:
            self.lm = load_model(config.model, self.device)
        self.objective = build_objective(config)
        self.expert: Expert = make_expert(config.expert, task=self.task, student=self.lm, noise=config.noise,
                                          seed=config.seed, top_k=config.expert_top_k, device=self.device,
                                          backend=config.backend)
        # The decoder pass of every training step goes through this (DDP across ranks).
        self.states = wrap_states(self.lm, self.dist)
        self.optimizer = torch.optim.AdamW(self.lm.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.sampling = SamplingConfig(config.temperature, config.top_p)
        self.step = 0
        self.rollouts = 0
        self.warm = False
        self.started = time.perf_counter()

    # ----------------------------------------------------------------------------- state

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self) -> None:
        """Write the checkpoint to a fresh directory, then swap it in: a kill leaves the old one whole.

        Rank 0 alone writes it (the ranks' weights and optimizer states are the same)."""
        if not self.dist.main:
            return
        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(self.lm.model.state_dict(), tmp / "model.pt")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self._expert_state(), tmp / "expert.pt")
        state = {"step": self.step, "rollouts": self.rollouts, "warm": self.warm,
                 "seconds": time.perf_counter() - self.started,
                 "config": dataclasses.asdict(self.config), "torch_rng": torch.get_rng_state().tolist()}
        (tmp / "state.json").write_text(json.dumps(state))
        old = self.out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, directory: Path | None = None) -> None:
        """Weights, optimizer, expert and loop state from `directory` (default: this run's).

        It leaves `metrics.jsonl` alone (`distil eval` loads a checkpoint of a run that may
        still be writing it); `run(resume=True)` drops the rows past the checkpoint."""
        directory = directory or find_checkpoint(self.out) or self.checkpoint_dir
        if not (directory / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint in {directory} (expected state.json, model.pt, optimizer.pt)")
        state = json.loads((directory / "state.json").read_text())
        self.lm.model.load_state_dict(torch.load(directory / "model.pt", map_location=self.device, weights_only=True))
        optimizer_state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer_state)
        self._load_expert_state(torch.load(directory / "expert.pt", map_location=self.device, weights_only=False))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self.step, self.rollouts, self.warm = state["step"], state["rollouts"], state["warm"]
        # The run's time so far counts on, as its rollouts do (a summary's seconds and the
        # result line are the whole run's); a checkpoint from before this was saved has none.
        self.started = time.perf_counter() - state.get("seconds", 0.0)

    def check_resume(self) -> None:
        """A ValueError unless `out` holds a checkpoint of a run with these options (but
        those of RESUME_MAY_CHANGE): resuming must continue that run, not silently start
        another (another objective) or fail deep in loading (another student size)."""
        saved = saved_config(self.out)
        mine = dataclasses.asdict(self.config)
        differ = [name for name in mine if name not in RESUME_MAY_CHANGE and name in saved
                  and saved[name] != mine[name]]
        differ += [name for name in saved if name not in mine]
        if differ:
            shown = "; ".join(f"{n}={saved.get(n)!r} there, {mine.get(n)!r} here" for n in differ)
            raise ValueError(f"--resume: the checkpoint in {self.out} is of a run with other options ({shown}); "
                             f"a resumed run may change only {', '.join(RESUME_MAY_CHANGE)}")

    @property
    def _clean_expert(self) -> Expert:
        """The expert without its noise (the noise itself holds no state)."""
        return self.expert.inner if isinstance(self.expert, NoisyExpert) else self.expert

    def _expert_state(self) -> dict:
        state: dict[str, Any] = {}
        expert = self._clean_expert
        if isinstance(expert, ModelExpert) and expert.ema is not None:
            state["ema"] = expert.lm.model.state_dict()
        return state

    def _load_expert_state(self, state: dict) -> None:
        expert = self._clean_expert
        if isinstance(expert, ModelExpert) and expert.ema is not None:
            expert.lm.model.load_state_dict(state["ema"])

    def _truncate_metrics(self) -> None:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        path.write_text("".join(row + "\n" for row in rows))

    # ----------------------------------------------------------------------------- phases

    def warm_start(self) -> None:
        """Supervised steps on reference solutions (teacher forcing)."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = c.warmup_lr
        # A bar here too: the default warm start is a good share of the demo's time.
        for i in _progress(range(c.warmup_steps), initial=0, total=c.warmup_steps, enabled=self.progress,
                           desc="warm start"):
            problems = self.task.problems(c.warmup_batch, seed=_step_seed(c.seed, i, "warmup"), split="train")
            problems = problems[slice(*self.dist.share(len(problems)))]
            prompt_ids, prompt_mask, actions, mask = teacher_forced(self.lm, [p.prompt for p in problems],
                                                                    [p.solution for p in problems])
            states = self.states(prompt_ids, prompt_mask, actions, mask)
            head = self.lm.head
            loss = linear_cross_entropy(states[mask], head.weight, actions[mask], bias=head.bias, softcap=head.softcap,
                                        backend=c.backend)
            self._apply(self._token_weighted(loss, int(mask.sum())))
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr
        # The warm-start moments would bias the first RL steps: start Adam afresh.
        self.optimizer.state.clear()
        self.warm = True

    def _token_weighted(self, loss: torch.Tensor, tokens: int) -> torch.Tensor:
        """A rank's loss (a mean over its own `tokens`) scaled by its share of the step's
        tokens: DDP averages the ranks' gradients, which then make the gradient of the
        whole step's token mean, as one process takes it, instead of weighing every rank
        the same whatever its number of tokens."""
        if not self.dist.enabled:
            return loss
        return loss * (tokens * self.dist.world / max(self.dist.total(tokens, self.device), 1))

    def _apply(self, loss: torch.Tensor) -> str:
        """Backward and step: "applied", "no signal" (a zero gradient), or the non-finite part.

        A zero gradient (GRPO when every group's rewards are equal) takes no step: Adam
        would still move every weight along its momentum, scaled by second moments that
        rare signals leave tiny, which wrecks a policy whose rewards are mostly zero.
        """
        self.optimizer.zero_grad(set_to_none=True)
        # Every rank skips, or none does: a backward that some ranks skip leaves DDP waiting.
        if not self.dist.all_ranks(bool(torch.isfinite(loss)), self.device):
            return "loss"
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.lm.model.parameters(), self.config.max_grad_norm)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return "gradient"
        if norm == 0:
            return "no signal"
        self.optimizer.step()
        return "applied"

    def train_step(self) -> dict[str, Any]:
        c = self.config
        start = time.perf_counter()
        problems = self.task.problems(c.prompts_per_step, seed=_step_seed(c.seed, self.step, "train"), split="train")
        first, last = self.dist.share(len(problems))
        problems = problems[first:last]
        rollouts = sample_rollouts(self.lm, [p.prompt for p in problems], num_rollouts=c.rollouts_per_prompt,
                                   max_tokens=self.task.max_response_chars + 1, sampling=self.sampling,
                                   seed=c.seed, step=self.step, backend=c.backend,
                                   row_offset=first * c.rollouts_per_prompt)
        sampled = time.perf_counter()
        repeated = [p for p in problems for _ in range(c.rollouts_per_prompt)]
        feedback = self.task.verify_batch(repeated, rollouts.texts)
        rewards = torch.tensor([f.reward for f in feedback], dtype=torch.float32, device=self.device)
        expert: SparseTarget | None = None
        if self.objective.needs_expert:
            expert = self.expert.targets(ExpertQuery(repeated, rollouts, feedback, step=self.step,
                                                     row_offset=first * c.rollouts_per_prompt))
        states = self.states(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.actions, rollouts.mask)
        batch = Batch(states, self.lm.head, rollouts.actions, rollouts.mask, rollouts.group, rewards, expert,
                      c.backend)
        loss, extra = self.objective.loss(batch)
        loss = self._token_weighted(loss, rollouts.num_tokens)
        outcome = self._apply(loss)
        if outcome == "applied":
            self.expert.after_update(self.lm)
        elif outcome != "no signal":
            self.log(f"step {self.step + 1}: non-finite {outcome}, update skipped")
        elapsed = time.perf_counter() - start
        self.step += 1
        self.rollouts += self.dist.total(len(repeated), self.device)
        measured = {"loss": float(loss.detach()), "reward": float(rewards.mean()),
                    "correct": sum(f.correct for f in feedback) / len(feedback),
                    "tokens_per_s": rollouts.num_tokens / max(sampled - start, 1e-9), "step_s": elapsed,
                    "skipped": int(outcome in ("loss", "gradient")), "no_signal": int(outcome == "no signal"),
                    **extra}
        return {"step": self.step, "rollouts": self.rollouts, **self.dist.average(measured, self.device)}

    def evaluate(self) -> dict[str, float]:
        c = self.config
        # The clean expert: the metric is the student's agreement with the expert the noise
        # corrupts, not with the corruption.
        metrics = evaluate(self.lm, self.task, prompts=c.eval_prompts, samples=c.eval_samples, seed=c.seed,
                           sampling=self.sampling, expert=self._clean_expert, backend=c.backend)
        return {f"eval_{k}": v for k, v in metrics.items()}

    # ----------------------------------------------------------------------------- run

    def close(self) -> None:
        """Leave the process group (nothing to do on one process).

        DDP's reducer holds the group, so the wrapper goes first: the group's gloo or NCCL
        teardown then runs inside `DistContext.close`, while every rank is still up, not
        at this process's exit, when rank 0 (which hosts the rendezvous store) may be gone.
        """
        if isinstance(self.states, torch.nn.parallel.DistributedDataParallel):
            self.states = self.states.module
            gc.collect()  # the wrapper's hooks hold it in reference cycles
        self.dist.close()

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to `steps`; the summary (on ranks other than 0, an empty dict)."""
        c = self.config
        main = self.dist.main
        if resume:
            self.check_resume()  # before config.json is overwritten
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
        if resume:
            self.load_checkpoint()
            if main:
                self._truncate_metrics()
            self.log(f"resumed from {self.checkpoint_dir} at step {self.step} ({self.rollouts} rollouts)")
        elif main:
            (self.out / "metrics.jsonl").write_text("")
        if not self.warm:
            if c.warmup_steps:
                self.log(f"warm start: {c.warmup_steps} supervised steps on reference solutions")
            self.warm_start()
        if not resume and main:
            row = {"step": 0, "rollouts": 0, "loss": None, "reward": None, "tokens_per_s": 0.0,
                   **self.evaluate()}
            self._append(row)
            self.save_checkpoint()
        bar = _progress(range(self.step, c.steps), initial=self.step, total=c.steps, enabled=self.progress)
        for _ in bar:
            row = self.train_step()
            if not main:
                continue
            if self.step % c.eval_every == 0 or self.step == c.steps:
                row.update(self.evaluate())
            self._append(row)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row['reward']:.2f}",
                                **({"pass@1": f"{row['eval_pass@1']:.2f}"} if "eval_pass@1" in row else {}))
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                self.save_checkpoint()
        self.dist.barrier()  # every rank leaves together, after rank 0's last evaluation
        return self.finish() if main else {}

    def _append(self, row: dict[str, Any]) -> None:
        # JSON has no NaN or inf (Python writes them bare, which jq and JavaScript refuse):
        # a value that is not finite (a skipped step's loss) is written as null.
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

    def finish(self) -> dict[str, Any]:
        rows = read_metrics(self.out / "metrics.jsonl")
        evals = [r for r in rows if "eval_pass@1" in r]
        summary = {
            "task": self.config.task, "objective": self.config.objective, "expert": self.config.expert,
            "seed": self.config.seed, "steps": self.step, "rollouts": self.rollouts,
            "pass@1_before": evals[0]["eval_pass@1"] if evals else None,
            "pass@1_after": evals[-1]["eval_pass@1"] if evals else None,
            "final_eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {},
            "skipped_steps": sum(r.get("skipped", 0) for r in rows),
            "seconds": round(time.perf_counter() - self.started, 1),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(rows, self.out / "curves.png", f"{self.config.task} / {self.config.objective}")
        return summary


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def _progress(iterable, *, initial: int, total: int, enabled: bool, desc: str = "train"):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, initial=initial, total=total, file=sys.stderr, dynamic_ncols=True, desc=desc)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [{k: math.nan if v is None else v for k, v in r.items()} for r in rows if r["step"] > 0]
    evals = [r for r in rows if "eval_pass@1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["rollouts"] for r in evals], [r["eval_pass@1"] for r in evals], marker="o")
    axes[0].set(xlabel="rollouts", ylabel="eval pass@1", title="held-out pass@1")
    axes[1].plot([r["rollouts"] for r in train], [r["reward"] for r in train])
    axes[1].set(xlabel="rollouts", ylabel="mean reward", title="training reward")
    axes[2].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[2].set(xlabel="step", ylabel="loss", title="loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
