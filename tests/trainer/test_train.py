"""The training loop, checkpoints and exact resume, the NaN guard, and the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distil.cli import main
from distil.evaluate import pass_at_k
from distil.experts import ExpertQuery, ModelExpert, NoisyExpert, OracleExpert
from distil.model import LanguageModel, tiny_student
from distil.rollout import SamplingConfig, sample_rollouts, visited_states
from distil.tasks import get_task
from distil.tokenizer import CharTokenizer
from distil.train import TrainConfig, Trainer, read_metrics

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(steps=4, warmup_steps=2, warmup_batch=8, prompts_per_step=4, rollouts_per_prompt=2, eval_every=2,
             eval_prompts=6, eval_samples=2, checkpoint_every=1, student_hidden=32, student_layers=1)
TIMING = {"tokens_per_s", "step_s"}


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_run_writes_metrics_summary_and_curves(tmp_path):
    summary = Trainer(TrainConfig(out=str(tmp_path), **SMALL), progress=False, log=lambda *_: None).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows[1:]:
        assert {"step", "rollouts", "loss", "reward", "tokens_per_s"} <= set(row)
        assert math.isfinite(row["loss"]) and row["skipped"] == 0
    assert [r["rollouts"] for r in rows] == [0, 8, 16, 24, 32]
    assert "eval_pass@1" in rows[0] and "eval_pass@1" in rows[2] and "eval_pass@1" in rows[4]
    assert summary["rollouts"] == 32 and summary["pass@1_after"] == rows[-1]["eval_pass@1"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("objective", ["distil", "ce", "grpo", "sdpo", "opsd"])
def test_every_objective_trains(tmp_path, objective):
    config = TrainConfig(out=str(tmp_path), objective=objective, **{**SMALL, "steps": 2})
    Trainer(config, progress=False, log=lambda *_: None).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows[1:]) and rows[-1]["skipped"] == 0


@pytest.mark.parametrize("expert", ["self", "ema:0.9"])
def test_model_experts_train(tmp_path, expert):
    config = TrainConfig(out=str(tmp_path), expert=expert, noise=0.2, expert_top_k=4, **{**SMALL, "steps": 2})
    trainer = Trainer(config, progress=False, log=lambda *_: None)
    assert isinstance(trainer.expert, NoisyExpert) and isinstance(trainer.expert.inner, ModelExpert)
    trainer.run()
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")[1:])


def test_evaluation_measures_the_clean_expert(tmp_path):
    """The expert-weighted metric is the student's agreement with the expert the noise
    corrupts: a wholly noisy expert (eps = 1) scores as the clean one."""
    quiet = dict(progress=False, log=lambda *_: None)
    clean = Trainer(TrainConfig(out=str(tmp_path / "clean"), **SMALL), **quiet).evaluate()
    noisy = Trainer(TrainConfig(out=str(tmp_path / "noisy"), noise=1.0, **SMALL), **quiet).evaluate()
    assert clean == noisy and clean["eval_expert_weighted"] > 0


def test_expert_noise_is_keyed_by_step_row_and_position():
    """A rank's share of a step's rows (row_offset), padded to another length, gets the
    noise a single process gives those rows; another step gets other noise; eps sets
    the rate and the random ids cover the vocabulary."""
    vocab_ids = torch.arange(10, 40)
    expert = NoisyExpert(OracleExpert.__new__(OracleExpert), 0.3, vocab_ids, seed=5)

    def noise(rows, step, row_offset=0, steps=50):
        return expert.noise(ExpertQuery([None] * rows, None, [], step=step, row_offset=row_offset), steps)

    corrupt, index = noise(400, step=3)
    share_corrupt, share_index = noise(150, step=3, row_offset=100, steps=20)
    assert torch.equal(share_corrupt, corrupt[100:250, :20]) and torch.equal(share_index, index[100:250, :20])
    assert not torch.equal(noise(400, step=4)[0], corrupt)
    # 20000 states at eps = 0.3: the rate within 5 standard deviations (0.016).
    assert abs(corrupt.double().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / corrupt.numel())
    assert torch.equal(torch.bincount(index.flatten(), minlength=len(vocab_ids)).gt(0),
                       torch.ones(len(vocab_ids), dtype=torch.bool))
    assert int(index.max()) < len(vocab_ids)
    for eps, expected in ((0.0, False), (1.0, True)):
        expert.eps = eps
        assert bool((noise(50, step=0)[0] == expected).all())


def test_resume_continues_exactly(tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    whole = tmp_path / "whole"
    Trainer(TrainConfig(out=str(whole), expert="ema:0.5", noise=0.3, **SMALL), **quiet).run()
    split = tmp_path / "split"
    Trainer(TrainConfig(out=str(split), expert="ema:0.5", noise=0.3, **{**SMALL, "steps": 2}), **quiet).run()
    Trainer(TrainConfig(out=str(split), expert="ema:0.5", noise=0.3, **SMALL), **quiet).run(resume=True)
    assert _comparable(read_metrics(split / "metrics.jsonl")) == _comparable(read_metrics(whole / "metrics.jsonl"))


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL a real `python -m distil train` mid-run, resume it, compare with an uninterrupted run."""
    flags = ["--steps", "6", "--warmup-steps", "2", "--warmup-batch", "8", "--prompts-per-step", "4",
             "--rollouts-per-prompt", "2", "--eval-every", "3", "--eval-prompts", "6", "--eval-samples", "2",
             "--checkpoint-every", "1", "--student-hidden", "32", "--student-layers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "distil", "train", *flags, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:  # steps 0..3 written
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(metrics)) < 7, "the run finished before the kill"
    assert main(["train", *flags, "--out", str(killed), "--resume"]) == 0
    whole = tmp_path / "whole"
    assert main(["train", *flags, "--out", str(whole)]) == 0
    assert _comparable(read_metrics(metrics)) == _comparable(read_metrics(whole / "metrics.jsonl"))


def test_non_finite_loss_skips_the_step_and_says_so(tmp_path):
    messages = []
    trainer = Trainer(TrainConfig(out=str(tmp_path), **{**SMALL, "steps": 3}), progress=False, log=messages.append)
    real_loss = trainer.objective.loss
    calls = {"n": 0}

    def sometimes_nan(batch):
        calls["n"] += 1
        loss, extra = real_loss(batch)
        return (loss * math.nan if calls["n"] == 2 else loss), extra

    trainer.objective.loss = sometimes_nan
    before = {}

    original_step = trainer.train_step

    def remember_step():
        if trainer.step == 1:
            before.update({k: v.detach().clone() for k, v in trainer.lm.model.state_dict().items()})
        row = original_step()
        if trainer.step == 2:
            after = trainer.lm.model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
        return row

    trainer.train_step = remember_step
    trainer.run()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # JSON has neither: null instead
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("skipped") for r in rows[1:]] == [0, 1, 0]
    assert rows[0]["loss"] is None and rows[2]["loss"] is None
    assert any("step 2: non-finite loss, update skipped" in m for m in messages)


def test_cli_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('objective = "ce"\nsteps = 5\nwarmup_steps = 1\nwarmup_batch = 4\nprompts_per_step = 2\n'
                      'rollouts_per_prompt = 2\neval_every = 1\neval_prompts = 4\neval_samples = 2\n'
                      'student_hidden = 32\n[task_options]\ndigits = 1\n')
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = [line for line in printed.splitlines() if line.startswith("result: ")]
    assert len(result) == 1 and result[0].startswith("result: addition ce pass@1 ")
    assert result[0].endswith(" s)") and "(8 rollouts, " in result[0]
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 2 and saved["objective"] == "ce" and saved["task_options"] == {"digits": 1}
    assert main(["eval", "--checkpoint", str(out), "--samples", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 2 and {"pass@1", "pass@3", "avg@3", "maj@3"} <= set(report)


def test_cli_rejects_bad_options(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("stepz = 3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert f"error: --config {config}: unknown option(s) stepz" in capsys.readouterr().err
    assert main(["train", "--objective", "nope", "--out", str(tmp_path)]) == 2
    assert "objective must be one of" in capsys.readouterr().err
    assert main(["train", "--task", "nope", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--noise", "-0.5", "noise must be in [0, 1], got -0.5"),
    ("--max-grad-norm", "0", "max_grad_norm must be > 0, got 0.0"),
    ("--temperature", "-1", "temperature must be >= 0 (0 is greedy), got -1.0"),
    ("--top-p", "1.5", "top_p must be in (0, 1] or None, got 1.5"),
    ("--future-credit", "nan", "future_credit must be finite, got nan"),
    ("--discount", "-1", "discount must be >= 0, got -1.0"),
    ("--baseline", "mean", "baseline must be one of none, group, got 'mean'"),
    ("--backend", "fast", "backend must be one of auto, torch, chunked, triton, cuda, got 'fast'"),
    ("--expert", "ema:abc", "expert 'ema:<decay>' needs a number in (0, 1) after 'ema:', got 'ema:abc'"),
])
def test_cli_refuses_bad_values_before_training(tmp_path, capsys, flag, value, message):
    """Refused at once, naming the option: not after the warm start, and never silently ignored."""
    out = tmp_path / "out"
    # A tiny run, so that a value wrongly accepted fails the test in seconds.
    tiny = ["--steps", "1", "--warmup-steps", "0", "--prompts-per-step", "1", "--eval-prompts", "1",
            "--eval-samples", "1", "--student-hidden", "32", "--student-layers", "1"]
    assert main(["train", *tiny, flag, value, "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not out.exists()


def test_eval_refuses_bad_arguments(tmp_path, capsys):
    flags = ["--steps", "1", "--warmup-steps", "1", "--warmup-batch", "2", "--prompts-per-step", "2",
             "--eval-prompts", "2", "--eval-samples", "1", "--student-hidden", "32", "--student-layers", "1"]
    assert main(["train", *flags, "--out", str(tmp_path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path), "--samples", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --samples must be an int >= 1, got 0"
    assert main(["eval", "--checkpoint", str(tmp_path), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_rollout_logprobs_and_padding():
    lm = tiny_student(0, torch.device("cpu"))
    r = sample_rollouts(lm, ["12+34=", "5+6="], num_rollouts=2, max_tokens=5, sampling=SamplingConfig(),
                        seed=3, step=1)
    with torch.no_grad():
        states = visited_states(lm, r.prompt_ids, r.prompt_mask, r.actions, r.mask)
        logq = torch.log_softmax(states @ lm.head.weight.T, -1).gather(2, r.actions[..., None])[..., 0]
        # fp32 throughout, |values| < 6: the cached decode and the full pass differ by a few
        # ulps (1e-6 measured); 1e-5 is about 16 ulps of the largest value.
        torch.testing.assert_close(logq[r.mask], r.logprobs[r.mask], rtol=0, atol=1e-5)
        # The short prompt is left-padded in the batch: its states equal those it has alone.
        alone_ids = r.prompt_ids[2:3, r.prompt_mask[2]]
        alone = visited_states(lm, alone_ids, torch.ones_like(alone_ids, dtype=torch.bool), r.actions[2:3],
                               r.mask[2:3])
        torch.testing.assert_close(alone[0][r.mask[2]], states[2][r.mask[2]], rtol=0, atol=1e-5)


def test_expert_tokenizer_checks():
    lm = tiny_student(0, torch.device("cpu"))

    class OtherTokenizer(CharTokenizer):
        vocab_size = CharTokenizer.vocab_size + 1

    other = LanguageModel(tiny_student(1, torch.device("cpu")).model, OtherTokenizer())
    with pytest.raises(ValueError, match="tokenizer .* differs from the student's"):
        ModelExpert(lm, other)
    other.tokenizer.single_characters = False
    with pytest.raises(ValueError, match="not one token per character"):
        OracleExpert(get_task("addition"), other)


def test_pass_at_k():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def _save_hf_model(path: Path, seed: int = 0) -> None:
    """A tiny Llama and a character-level fast tokenizer, saved as a transformers checkpoint."""
    import tokenizers
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from distil.tokenizer import CHARACTERS

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(CHARACTERS)}}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern=tokenizers.Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_student_from_a_local_transformers_checkpoint(tmp_path, capsys):
    model_dir = tmp_path / "model"
    _save_hf_model(model_dir)
    flags = ["--model", str(model_dir), "--expert", "self", "--steps", "2", "--warmup-steps", "1",
             "--warmup-batch", "4", "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--eval-every", "2",
             "--eval-prompts", "4", "--eval-samples", "2", "--no-progress"]
    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 0
    assert "result: addition distil pass@1 " in capsys.readouterr().out
    # A character oracle cannot speak a tokenizer it does not know to be one token per character.
    assert main(["train", "--model", str(model_dir), "--expert", "oracle", "--out", str(tmp_path / "x")]) == 2
    assert "not one token per character" in capsys.readouterr().err
    # An expert model with another vocabulary is refused before training starts.
    other = tmp_path / "other"
    _save_hf_model(other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    assert main(["train", "--model", str(model_dir), "--expert", f"model:{other}", "--out", str(tmp_path / "y")]) == 2
    assert "differs from the student's" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "z")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- robustness of the CLI

# A run of a second or two: a value that is wrongly accepted fails the test quickly.
TINY_TOML = ("steps = 1\nwarmup_steps = 1\nwarmup_batch = 2\nprompts_per_step = 2\nrollouts_per_prompt = 2\n"
             "eval_every = 1\neval_prompts = 2\neval_samples = 1\nstudent_hidden = 16\nstudent_layers = 1\n")


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.strip() and "%|" not in line]  # no bars
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(("text", "message"), [
    ("steps = \n", "--config {path}: Invalid value"),  # not TOML
    ('{"steps": 2}', "--config {path}: Invalid statement"),  # JSON
    ("stepz = 3\n", "--config {path}: unknown option(s) stepz; known: task, "),
    ("noise = true\n", "noise must be a number, got True"),  # not the noise of 1.0 a bool would be
    ('lr = "0.1"\n', "lr must be a number, got '0.1'"),
    ("steps = 2.0\n", "steps must be an int, got 2.0"),
    ("task_options = 3\n", "task_options must be a table, got 3"),
    ("model = 3\n", "model must be a string or None, got 3"),
    ("student_hidden = 12\n", "student_hidden must be a multiple of 8, got 12"),  # not a rotary-embedding traceback
    ("seed = 99999999999999999999999\n", "seed must be an int in [-2**63, 2**64), got 99999999999999999999999"),
])
def test_cli_refuses_bad_config_files(tmp_path, capsys, text, message):
    """A config file that is not TOML, or gives a value of the wrong type, is refused in one
    line naming --config or the option: never a traceback, never a run with the value
    misread (a bool taken for a number)."""
    path = tmp_path / "run.toml"
    key = text.split("=")[0].strip()
    # The tiny run's options but the one under test (TOML refuses a key given twice).
    tiny = "".join(line + "\n" for line in TINY_TOML.splitlines() if line.split(" =")[0] != key)
    path.write_text(text if key in ("steps", '{"steps": 2}') and "2.0" not in text else tiny + text)
    out = tmp_path / "out"
    assert main(["train", "--config", str(path), "--out", str(out), "--no-progress"]) == 2
    assert _one_line_error(capsys).startswith("error: " + message.format(path=path))
    assert not out.exists()


def test_cli_refuses_unreadable_config_paths(tmp_path, capsys):
    for path in (tmp_path / "missing.toml", tmp_path):  # no such file; a directory (was a traceback)
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        assert _one_line_error(capsys).startswith(f"error: --config {path}: ")


def test_cli_refuses_an_out_that_cannot_be_a_directory(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", "--config", str(config), "--out", str(a_file), "--no-progress"]) == 2
    assert _one_line_error(capsys) == f"error: out {str(a_file)!r} exists and is not a directory"
    below = a_file / "run"
    assert main(["train", "--config", str(config), "--out", str(below), "--no-progress"]) == 2
    assert _one_line_error(capsys).startswith(f"error: out {str(below)!r}: cannot create it: ")
    assert a_file.read_text() == "x"


def test_resume_continues_the_checkpointed_run(tmp_path, capsys):
    """`distil train --out DIR --resume` continues the run in DIR with its own options (it
    used to continue with the defaults: another objective, silently); a flag that would
    change the run is refused, as is a resume with no checkpoint, before anything is written."""
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--task", "sorting", "--objective", "grpo", "--out", str(out),
                 "--no-progress"]) == 0
    first_seconds = json.loads((out / "summary.json").read_text())["seconds"]
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--steps", "2", "--resume", "--no-progress"]) == 0
    assert "result: sorting grpo pass@1 " in capsys.readouterr().out
    # The whole run's time, as its rollouts count the whole run's, not the resumed part's.
    assert json.loads((out / "summary.json").read_text())["seconds"] >= first_seconds
    saved = json.loads((out / "config.json").read_text())
    assert (saved["objective"], saved["task"], saved["student_hidden"], saved["steps"]) == ("grpo", "sorting", 16, 2)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["rollouts"] for r in rows] == [0, 4, 8]
    for flags, shown in ((["--objective", "ce"], "objective='grpo' there, 'ce' here"),
                         (["--student-hidden", "32"], "student_hidden=16 there, 32 here")):
        assert main(["train", "--out", str(out), "--steps", "3", *flags, "--resume", "--no-progress"]) == 2
        assert shown in _one_line_error(capsys)
    assert json.loads((out / "config.json").read_text()) == saved
    missing = tmp_path / "missing"
    assert main(["train", "--config", str(config), "--out", str(missing), "--resume", "--no-progress"]) == 2
    assert _one_line_error(capsys).startswith(f"error: --resume: no checkpoint in {missing} ")
    assert not missing.exists()


def test_eval_leaves_the_runs_metrics_alone(tmp_path, capsys):
    """Evaluating a checkpoint while its run goes on (rows past the checkpoint) must not cut
    the run's metrics.jsonl; a damaged checkpoint is refused in one line."""
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:  # the run has gone one step past its last checkpoint
        f.write(json.dumps({"step": 2, "rollouts": 8, "loss": 1.0, "reward": 0.0, "tokens_per_s": 1.0}) + "\n")
    before = metrics.read_text()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    assert metrics.read_text() == before
    (out / "checkpoint" / "model.pt").unlink()
    assert main(["eval", "--checkpoint", str(out)]) == 2
    assert _one_line_error(capsys).startswith(f"error: --checkpoint {out}: cannot load it: ")
    (out / "checkpoint" / "state.json").write_text("{bad")
    assert main(["eval", "--checkpoint", str(out)]) == 2
    assert _one_line_error(capsys).startswith(f"error: --checkpoint {out}: cannot read ")


def test_model_directory_without_weights_or_tokenizer_is_refused(tmp_path, capsys):
    """--model PATH without a tokenizer used to train on an empty one transformers makes up
    (every prompt encoded to nothing); without weights it was a traceback."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "model"
    _save_hf_model(model_dir)
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    flags = ["--config", str(config), "--expert", "self", "--no-progress"]
    # A GPT-2 (whose tokenizer transformers would make up empty) without tokenizer files.
    no_tokenizer = tmp_path / "no_tokenizer"
    GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=16, n_layer=1, n_head=2, n_positions=256, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)).save_pretrained(no_tokenizer)
    assert main(["train", *flags, "--model", str(no_tokenizer), "--out", str(tmp_path / "a")]) == 2
    # transformers 5 makes the empty tokenizer up (refused here); 4.x fails to load one,
    # saying why in its own words (no files; protobuf to convert one).
    error = _one_line_error(capsys)
    assert error.startswith(f"error: --model {str(no_tokenizer)!r}:"), error
    assert "its tokenizer encodes" in error or "not a transformers causal LM with its tokenizer" in error, error
    (model_dir / "model.safetensors").unlink()
    assert main(["train", *flags, "--model", str(model_dir), "--out", str(tmp_path / "b")]) == 2
    assert _one_line_error(capsys).startswith(f"error: --model {str(model_dir)!r}: not a transformers causal LM")
