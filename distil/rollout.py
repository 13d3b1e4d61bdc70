"""Rollouts: a KV-cache decode loop that samples with `linear_sample` on the last hidden
state, so the [B, V] logits of a step are never built; and the states a rollout visited,
recomputed with gradients for the update.

Sequences are left-padded prompts followed by the response: after the prompt every row
decodes in lockstep, and a row that has ended keeps emitting padding that the mask
drops. Each row has its own Philox seed (from the run seed, the step and the row) and
the decode position is the counter, so a rollout does not depend on the batch around it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from distil_kernels import linear_sample

from .model import LanguageModel, hidden_states


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None


@dataclass
class Rollouts:
    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] bool
    actions: Tensor  # [B, T] sampled tokens, padding after the end token
    mask: Tensor  # [B, T] bool: tokens the policy sampled (the end token included)
    logprobs: Tensor  # [B, T] fp32 log-prob of each action under the sampling distribution
    texts: list[str]  # decoded responses
    group: Tensor  # [B] index of the prompt each rollout answers

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def row_seeds(seed: int, step: int, rows: int, device: torch.device, row_offset: int = 0,
              purpose: str = "rollout") -> Tensor:
    """Distinct 62-bit Philox seeds per (run seed, step, row); rows from `row_offset` on.

    Each `purpose` (the rollouts' sampling, the expert's noise) gets seeds of its own."""
    digest = hashlib.blake2b(f"distil-{purpose}:{seed}:{step}".encode(), digest_size=8).digest()
    base = int.from_bytes(digest, "little") >> 3  # room for `rows` above it inside int64
    return base + row_offset + torch.arange(rows, dtype=torch.int64, device=device)


def encode_prompts(lm: LanguageModel, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Left-padded [BOS] + prompt ids [B, P] and their mask."""
    tok = lm.tokenizer
    encoded = [[tok.bos_id] + tok.encode(p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = True
    return ids.to(lm.device), mask.to(lm.device)


def _positions(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)


@torch.no_grad()
def sample_rollouts(lm: LanguageModel, prompts: list[str], *, num_rollouts: int, max_tokens: int,
                    sampling: SamplingConfig, seed: int, step: int, backend: str = "auto",
                    row_offset: int = 0) -> Rollouts:
    """`num_rollouts` responses per prompt of at most `max_tokens` tokens (end token included).

    `row_offset`: the first row's index in the step's whole batch (a rank's share under
    torchrun), which names the rows' seeds.
    """
    tok = lm.tokenizer
    repeated = [p for p in prompts for _ in range(num_rollouts)]
    group = torch.arange(len(prompts), device=lm.device).repeat_interleave(num_rollouts)
    prompt_ids, prompt_mask = encode_prompts(lm, repeated)
    rows = prompt_ids.shape[0]
    head = lm.head
    seeds = row_seeds(seed, step, rows, lm.device, row_offset)
    was_training = lm.model.training
    lm.model.eval()
    attention = prompt_mask.long()
    hidden, cache = hidden_states(lm.model, prompt_ids, attention, _positions(prompt_mask), use_cache=True)
    last = hidden[:, -1]
    next_position = attention.sum(dim=1)
    actions, logprobs, live = [], [], []
    done = torch.zeros(rows, dtype=torch.bool, device=lm.device)
    for t in range(max_tokens):
        sample = linear_sample(last, head.weight, bias=head.bias, softcap=head.softcap,
                               temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                               seed=seeds, positions=torch.full_like(seeds, t), backend=backend)
        token = torch.where(done, tok.pad_id, sample.ids[:, 0])
        actions.append(token)
        logprobs.append(torch.where(done, 0.0, sample.logprobs[:, 0]))
        live.append(~done)
        done = done | (token == tok.eos_id)
        if bool(done.all()) or t == max_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones(rows, 1, dtype=attention.dtype, device=lm.device)], dim=1)
        hidden, cache = hidden_states(lm.model, token[:, None], attention, next_position[:, None], cache,
                                      use_cache=True)
        last = hidden[:, -1]
        next_position = next_position + 1
    lm.model.train(was_training)
    actions_t = torch.stack(actions, dim=1)
    texts = [tok.decode(row.tolist()) for row in actions_t.cpu()]
    return Rollouts(prompt_ids, prompt_mask, actions_t, torch.stack(live, dim=1), torch.stack(logprobs, dim=1),
                    texts, group)


def visited_states(lm: LanguageModel, prompt_ids: Tensor, prompt_mask: Tensor, actions: Tensor,
                   mask: Tensor) -> Tensor:
    """Hidden states [B, T, d] at which each action was chosen (with gradients).

    The state before action t is the prompt plus actions[:t]: the decoder runs over
    prompt + actions once, and position P - 1 + t holds it.
    """
    ids = torch.cat([prompt_ids, actions], dim=1)
    attention = torch.cat([prompt_mask, mask], dim=1)
    hidden, _ = hidden_states(lm.model, ids, attention.long(), _positions(attention))
    p = prompt_ids.shape[1]
    return hidden[:, p - 1 : p - 1 + actions.shape[1]]


def teacher_forced(lm: LanguageModel, prompts: list[str], responses: list[str]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(prompt_ids, prompt_mask, actions, mask) for given responses, each ending in the end token."""
    tok = lm.tokenizer
    prompt_ids, prompt_mask = encode_prompts(lm, prompts)
    encoded = [tok.encode(r) + [tok.eos_id] for r in responses]
    width = max(len(e) for e in encoded)
    actions = torch.full((len(encoded), width), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for i, e in enumerate(encoded):
        actions[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = True
    return prompt_ids, prompt_mask, actions.to(lm.device), mask.to(lm.device)
