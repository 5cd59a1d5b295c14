"""train.py end to end on small synthetic runs: learning, exact resume, NaN stop, Ctrl-C, torchrun."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from helpers import TINY, read_log, run_training
from segformer.errors import ConfigError
from training.loop import steps
from training.train_config import TrainConfig, parse_command_line

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, *extra):
    return run_training(tmp_path, *extra)


def test_a_few_steps_lower_the_loss_and_write_everything(tmp_path):
    result = run(tmp_path, "--max-steps", "20", "--eval-every", "10", "--save-every", "5", "--save-total-limit", "2")
    records = read_log(tmp_path)
    losses = [r["loss"] for r in records if "mean_iou" not in r]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    evaluations = [r for r in records if "mean_iou" in r]
    assert [r["step"] for r in evaluations] == [10, 20]
    assert {"step", "loss", "lr", "mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou",
            "per_category_accuracy"} <= set(evaluations[0])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]  # limit 2
    assert (tmp_path / "best" / "model.safetensors").is_file()
    assert result["best_miou"] == max(r["mean_iou"] for r in evaluations)
    # the checkpoint is a hub-layout model: transformers loads it
    from transformers import SegformerForSemanticSegmentation
    reference = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "checkpoint-20")
    assert reference.config.id2label[0] == "sky"


def interrupt_at_loss_call(monkeypatch, n):
    """Ctrl-C during the n-th loss computation: the run saves after that step and exits 130."""
    calls = {"n": 0}
    original = train.segmentation_loss

    def interrupting_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(train, "segmentation_loss", interrupting_loss)
    return original


# Every on/off setting away from its default, and numeric ones away from theirs: all must survive --resume.
NON_DEFAULT = ["--no-reduce-labels", "--num-labels", "8", "--channels-last", "--skip-bad", "--no-decay-norm-bias",
               "--sync-bn", "--head-lr-mult", "5", "--clip-grad", "0.5", "--warmup-steps", "3", "--seed", "3"]


def test_interrupt_then_resume_equals_a_straight_run(tmp_path, monkeypatch, capsys):
    steps = ["--max-steps", "8", "--eval-every", "3", "--save-every", "100", *NON_DEFAULT]
    run(tmp_path / "straight", *steps)

    original = interrupt_at_loss_call(monkeypatch, 5)  # the 3rd step (2 micro-batches each)
    assert train.main(TINY + ["--out", str(tmp_path / "split"), *steps]) == 130
    assert "interrupted: saved" in capsys.readouterr().out
    monkeypatch.setattr(train, "segmentation_loss", original)

    train.execute(["--resume", str(tmp_path / "split" / "checkpoint-3")])  # nothing but the checkpoint
    straight = load_file(tmp_path / "straight" / "checkpoint-8" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "checkpoint-8" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    state = torch.load(tmp_path / "split" / "checkpoint-8" / "training_state.pt", weights_only=True)
    assert state["step"] == 8 and state["epoch"] == 1 and state["batches_done"] == 6
    settings = TrainConfig.load(tmp_path / "split" / "checkpoint-8" / "training_args.json")
    assert settings == replace(TrainConfig.load(tmp_path / "straight" / "checkpoint-8" / "training_args.json"),
                               out=str(tmp_path / "split"))
    assert (settings.reduce_labels, settings.channels_last, settings.skip_bad, settings.decay_norm_bias,
            settings.sync_bn, settings.head_lr_mult, settings.clip_grad) == (False, True, True, False, True, 5.0, 0.5)
    preprocessor = json.loads((tmp_path / "split" / "checkpoint-8" / "preprocessor_config.json").read_text())
    assert preprocessor["do_reduce_labels"] is False


def test_resume_refuses_a_changed_setting_by_name_and_applies_a_free_one(tmp_path, capsys):
    run(tmp_path, "--max-steps", "2", "--eval-every", "100", "--save-every", "2")
    checkpoint = str(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"--lr 0\.5: the run in .*checkpoint-2 was trained with 0\.001"):
        train.execute(["--resume", checkpoint, "--lr", "0.5"])
    with pytest.raises(ConfigError, match=r"--reduce-labels false: .* was trained with true"):
        train.execute(["--resume", checkpoint, "--no-reduce-labels"])
    train.execute(["--resume", checkpoint, "--lr", "0.001", "--max-steps", "3", "--log-every", "3"])  # same lr: fine
    settings = TrainConfig.load(tmp_path / "checkpoint-3" / "training_args.json")
    assert (settings.max_steps, settings.log_every, settings.lr) == (3, 3, 1e-3)


def test_eval_only_reproduces_the_numbers_the_run_logged(tmp_path):
    """A --no-reduce-labels run evaluated later takes size, reduction and labels from its checkpoint."""
    run(tmp_path, "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--no-reduce-labels",
        "--num-labels", "8")
    logged = [r for r in read_log(tmp_path) if "mean_iou" in r][-1]
    metrics = train.execute(["--eval-only", "--checkpoint", str(tmp_path / "checkpoint-2")])
    assert metrics["mean_iou"] == logged["mean_iou"] and metrics["overall_accuracy"] == logged["overall_accuracy"]
    # reduced, the synthetic annotations are its 7 named classes: not the checkpoint's 8
    with pytest.raises(ConfigError, match=r"the checkpoint .*checkpoint-2 has 8 classes \(LABEL_0, .*\) but the "
                                          r"data synthetic has 7 \(sky, grass, water, wall, ...\)"):
        train.execute(["--eval-only", "--checkpoint", str(tmp_path / "checkpoint-2"), "--reduce-labels"])


def test_labels_that_contradict_the_data_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--num-labels 8, but the data synthetic has 7 classes"):
        run(tmp_path, "--num-labels", "8")
    (tmp_path / "names.json").write_text('{"0": "a", "1": "b"}')
    with pytest.raises(ConfigError, match=r"--id2label .*names\.json has 2 classes \(a, b\) but the data synthetic"):
        run(tmp_path, "--id2label", str(tmp_path / "names.json"))


def test_each_flag_changes_what_it_names(tmp_path, monkeypatch):
    """--amp bf16, --channels-last, --no-decay-norm-bias, --head-lr-mult and --clip-grad, each observed."""
    command = parse_command_line(TINY + ["--out", str(tmp_path), "--max-steps", "1", "--amp", "bf16",
                                         "--channels-last", "--no-decay-norm-bias", "--head-lr-mult", "10",
                                         "--clip-grad", "1e-3"])
    run_ = train.build_run(command, rank=0, world_size=1, device=torch.device("cpu"))
    seen = {}
    model = run_.raw_model
    model.encoder.stages[0].blocks[0].attn.q.register_forward_hook(
        lambda module, inputs, output: seen.update(dtype=output.dtype))
    model.register_forward_pre_hook(lambda module, inputs: seen.update(
        input_channels_last=inputs[0].is_contiguous(memory_format=torch.channels_last)))
    clip = torch.nn.utils.clip_grad_norm_

    def clip_and_measure(parameters, max_norm, **kwargs):
        parameters = list(parameters)
        clip(parameters, max_norm, **kwargs)
        seen["norm_after_clip"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_measure)
    loss, lr = train.train_step(run_, next(steps(run_)))
    run_.log.close()

    assert seen["dtype"] == torch.bfloat16
    assert seen["input_channels_last"]
    assert model.encoder.stages[0].patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen["norm_after_clip"] == pytest.approx(1e-3, rel=1e-3)
    assert lr == 0.5e-3  # the step's rate: the 1st of a 2-step warmup
    rates = {g["name"]: (g["lr"], g["weight_decay"]) for g in run_.optimizer.param_groups}
    assert rates == {"encoder": (1e-3, 0.01), "encoder, no decay": (1e-3, 0.0),  # the next step's: warmed up
                     "head": (1e-2, 0.01), "head, no decay": (1e-2, 0.0)}
    assert run_.optimizer.defaults["fused"]  # one kernel per step, as the Trainer's adamw_torch_fused


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        run(tmp_path, "--max-steps", "1", "--amp", "fp16", "--device", "cpu")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = train.segmentation_loss

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss
    monkeypatch.setattr(train, "segmentation_loss", nan_at_step_3)
    with pytest.raises(train.Diverged, match=r"the loss is nan at step 3 \(its samples: synthetic-train-\d+, "):
        run(tmp_path, "--max-steps", "6", "--eval-every", "100", "--save-every", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    state = torch.load(tmp_path / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["step"] == 2


def test_eval_only_prints_the_class_table(tmp_path, capsys):
    run(tmp_path, "--max-steps", "2", "--eval-every", "100", "--save-every", "100")
    capsys.readouterr()
    metrics = train.execute(["--eval-only", "--checkpoint", str(tmp_path / "checkpoint-2"),
                          "--eval-split", "validation[:4]"])  # size 64 read off the checkpoint
    out = capsys.readouterr().out
    assert "sky" in out and "mean" in out and "overall accuracy" in out
    assert 0 <= metrics["mean_iou"] <= 1


def test_torchrun_two_processes_on_cpu(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *TINY, "--max-steps", "3", "--eval-every", "3", "--save-every", "3",
               "--device", "cpu", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 x cpu" in done.stdout
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file()
    state = torch.load(tmp_path / "checkpoint-3" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # both processes' generators, for an exact resume
    assert len([r for r in read_log(tmp_path) if "mean_iou" in r]) == 1  # only rank 0 logs


def test_checkpoints_carry_the_input_size_for_inference(tmp_path):
    from transformers import SegformerImageProcessor
    from segformer.checkpoint import describe
    run(tmp_path, "--max-steps", "1", "--eval-every", "100", "--save-every", "1")
    assert describe(tmp_path / "checkpoint-1").size == 64
    processor = SegformerImageProcessor.from_pretrained(tmp_path / "checkpoint-1")  # transformers reads it too
    assert processor.size == {"height": 64, "width": 64} and processor.do_reduce_labels


def test_a_new_run_does_not_overwrite_an_earlier_one(tmp_path):
    run(tmp_path, "--max-steps", "2", "--eval-every", "100", "--save-every", "1")
    before = (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint-2, checkpoint-1, best\).*--resume"):
        run(tmp_path, "--max-steps", "2", "--seed", "1")
    assert (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes() == before
    run(tmp_path, "--max-steps", "1", "--eval-every", "100", "--save-every", "1", "--seed", "1", "--overwrite")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert len(read_log(tmp_path)) == 2  # one training and one evaluation line: the old log is gone
