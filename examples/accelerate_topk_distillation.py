"""Distil a student from a teacher's sparse top-k targets in an Accelerate training loop.

    pip install accelerate
    python examples/accelerate_topk_distillation.py            # CPU or one GPU
    accelerate launch examples/accelerate_topk_distillation.py # several processes or GPUs

The teacher's next-token distribution at every position is reduced to its top-k ids and
probabilities with `linear_topk` on its last hidden states, and the student is trained
with `linear_cross_entropy` against that `SparseTarget` (tail="bucket": the teacher's
mass outside its top-k counts as one more class). Neither model ever builds [tokens x
vocab] logits. The loss lives inside the module that `accelerator.prepare` wraps, so
under DDP the forward that computes it is the wrapped one and the gradients are synced.

Tiny random Llama models and random token batches stand in for real checkpoints and
data (nothing is downloaded): swap `tiny_llama` for `AutoModelForCausalLM.from_pretrained`
and the batches for your dataset. Without Accelerate the script says so and exits.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from distil_kernels import SparseTarget, linear_cross_entropy, linear_topk


class SparseDistillation(nn.Module):
    """The student plus its loss against sparse targets: what `accelerator.prepare` wraps."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        hidden = self.student.model(input_ids=input_ids).last_hidden_state
        head = self.student.get_output_embeddings()
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                    SparseTarget(target_ids, target_probs), bias=head.bias, tail="bucket")


def tiny_llama(seed: int, hidden: int, layers: int, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, input_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (ids, probabilities) at every position, [B * T, k] each."""
    hidden = teacher.model(input_ids=input_ids).last_hidden_state
    head = teacher.get_output_embeddings()
    top = linear_topk(hidden.reshape(-1, hidden.shape[-1]), head.weight, k, bias=head.bias)
    return top.ids, top.logprobs.exp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--k", type=int, default=16, help="teacher ids kept per position")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        from accelerate import Accelerator
    except ImportError:
        print("skipped: this example needs Accelerate (pip install accelerate)")
        return 0

    accelerator = Accelerator()
    teacher = tiny_llama(seed=1, hidden=64, layers=2)
    with torch.no_grad():  # a confident teacher: most of its mass in its top-k, as a trained model's
        teacher.get_output_embeddings().weight.mul_(12.0)
    teacher = teacher.to(accelerator.device).eval()
    model = SparseDistillation(tiny_llama(seed=2, hidden=32, layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    gen = torch.Generator().manual_seed(1000 + accelerator.process_index)  # each process its own batches
    losses = []
    for step in range(args.steps):
        input_ids = torch.randint(0, 512, (args.batch, args.seq), generator=gen).to(accelerator.device)
        target_ids, target_probs = teacher_targets(teacher, input_ids, args.k)
        loss = model(input_ids, target_ids, target_probs)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        if accelerator.is_main_process and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step + 1:3d}/{args.steps}: loss against the teacher's top-{args.k} {losses[-1]:.4f}")
    if accelerator.is_main_process:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps "
              f"({accelerator.num_processes} process(es), {accelerator.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
