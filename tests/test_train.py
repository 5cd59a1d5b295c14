"""train.py end to end on small synthetic runs: learning, exact resume, NaN stop, Ctrl-C, torchrun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]
# 20 training images of 64x64, 2 x 2 images per step: 5 steps per epoch, so 8 steps cross an epoch.
TINY = ["--train-split", "train[:20]", "--eval-split", "validation[:8]", "--size", "64", "--batch-size", "2",
        "--grad-accum", "2", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1"]


def run(tmp_path, *extra):
    return train.main(train.get_args(TINY + ["--out", str(tmp_path)] + list(extra)))


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


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


def test_interrupt_then_resume_equals_a_straight_run(tmp_path, monkeypatch, capsys):
    steps = ["--max-steps", "8", "--eval-every", "3", "--save-every", "100"]
    run(tmp_path / "straight", *steps)

    calls = {"n": 0}
    original = train.segmentation_loss

    def interrupting_loss(*args, **kwargs):  # Ctrl-C during the 3rd step: saved after it
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(train, "segmentation_loss", interrupting_loss)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "split", *steps)
    assert stop.value.code == 130
    assert "interrupted: saved" in capsys.readouterr().out
    monkeypatch.setattr(train, "segmentation_loss", original)

    train.main(train.get_args(["--resume", str(tmp_path / "split" / "checkpoint-3")]))
    straight = load_file(tmp_path / "straight" / "checkpoint-8" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "checkpoint-8" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    state = torch.load(tmp_path / "split" / "checkpoint-8" / "training_state.pt", weights_only=False)
    assert state["step"] == 8 and state["epoch"] == 1 and state["batches_done"] == 6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = train.segmentation_loss

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss
    monkeypatch.setattr(train, "segmentation_loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3"):
        run(tmp_path, "--max-steps", "6", "--eval-every", "100", "--save-every", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    state = torch.load(tmp_path / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["step"] == 2


def test_eval_only_prints_the_class_table(tmp_path, capsys):
    run(tmp_path, "--max-steps", "2", "--eval-every", "100", "--save-every", "100")
    capsys.readouterr()
    metrics = train.main(train.get_args(["--eval-only", "--checkpoint", str(tmp_path / "checkpoint-2"),
                                         "--eval-split", "validation[:4]"]))  # size 64 read off the checkpoint
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
    state = torch.load(tmp_path / "checkpoint-3" / "training_state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # both processes' generators, for an exact resume
    assert len([r for r in read_log(tmp_path) if "mean_iou" in r]) == 1  # only rank 0 logs


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    result = run(tmp_path, "--max-steps", "2", "--eval-every", "2", "--save-every", "100", "--amp", "bf16",
                 "--channels-last", "--no-decay-norm-bias", "--head-lr-mult", "10", "--clip-grad", "1.0")
    assert result["step"] == 2 and 0 <= result["mean_iou"] <= 1
    with pytest.raises(SystemExit, match="fp16 needs a CUDA device"):
        run(tmp_path, "--max-steps", "1", "--amp", "fp16", "--device", "cpu")


def test_checkpoints_carry_the_input_size_for_inference(tmp_path):
    from transformers import SegformerImageProcessor
    from segformer.checkpoint import read_input_size
    run(tmp_path, "--max-steps", "1", "--eval-every", "100", "--save-every", "1")
    assert read_input_size(tmp_path / "checkpoint-1") == 64
    processor = SegformerImageProcessor.from_pretrained(tmp_path / "checkpoint-1")  # transformers reads it too
    assert processor.size == {"height": 64, "width": 64} and processor.do_reduce_labels


def test_a_new_run_does_not_overwrite_an_earlier_one(tmp_path):
    run(tmp_path, "--max-steps", "2", "--eval-every", "100", "--save-every", "1")
    before = (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a run \(checkpoint-2, checkpoint-1, best\).*--resume"):
        run(tmp_path, "--max-steps", "2", "--seed", "1")
    assert (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes() == before
    run(tmp_path, "--max-steps", "1", "--eval-every", "100", "--save-every", "1", "--seed", "1", "--overwrite")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert len(read_log(tmp_path)) == 2  # one training and one evaluation line: the old log is gone
