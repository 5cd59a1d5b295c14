"""Faults, bad input and hostile files: nothing lost, nothing silently wrong, one line naming the culprit."""

import errno
import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import infer
import train
from data import DataError, build_dataset, build_loader, open_source
from helpers import random_image, read_log, run_training, write_ade_folder, write_flat_folder
from segformer import SegFormer
from segformer.cli import run_main
from segformer.weight_layouts import WeightLayoutError
from training import run_folder
from segformer.errors import CheckpointError, ConfigError
from training.run_folder import RunLock, RunLocked

# 8 synthetic images of 32x32, one step of 2: runs of a second or two.
QUICK = ["--train-split", "train[:8]", "--eval-split", "validation[:4]", "--size", "32", "--batch-size", "2",
         "--warmup-steps", "0", "--log-every", "1", "--eval-every", "100", "--save-every", "1", "--no-plots"]


def quick(out, *extra):
    return run_training(out, *extra, base=QUICK)


# ---- security ----------------------------------------------------------------------------------------

class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_training_state_cannot_run_code(tmp_path):
    quick(tmp_path / "run", "--max-steps", "1")
    state = tmp_path / "run" / "checkpoint-1" / "training_state.pt"
    torch.save({"optimizer": Planted(tmp_path / "pwned")}, state)
    with pytest.raises(CheckpointError, match=r"checkpoint-1/training_state\.pt: not a training state this project"):
        train.execute(["--resume", str(tmp_path / "run" / "checkpoint-1")])
    assert not (tmp_path / "pwned").exists()


PLANTED = """
from pathlib import Path
Path({marker!r}).write_text("imported")  # what code from a checkpoint could do: anything, on import
import torch.nn as nn
class Head(nn.Module):
    pass
"""


@pytest.fixture()
def planted_checkpoint(tmp_path, monkeypatch):
    """A checkpoint whose config.json names a part in a module that, on import, writes a marker file; the
    module is importable (on sys.path), as a hostile checkpoint's would be after `pip install` of anything."""
    import sys

    from segformer import SegFormer
    from segformer.checkpoint import write_preprocessor_config
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "planted_part.py").write_text(PLANTED.format(marker=str(tmp_path / "imported")))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    monkeypatch.delitem(sys.modules, "planted_part", raising=False)
    folder = tmp_path / "planted"
    SegFormer.from_variant("b0", num_labels=3, depths=[1, 1, 1, 1]).save_pretrained(folder)
    write_preprocessor_config(folder, size=32, reduce_labels=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"segformer_parts": {"decoder": "planted_part:Head"}}))
    random_image(32, 32).save(tmp_path / "photo.png")
    return folder


PRETRAIN = ["--train-split", "train[:8]", "--eval-split", "validation[:4]", "--size", "32", "--batch-size", "4",
            "--max-steps", "1", "--no-plots"]
ENTRY_POINTS = {  # each command a user runs on a checkpoint they were given, without --trust-code
    "train --pretrained": lambda c, t: train.main(QUICK + ["--pretrained", str(c), "--out", str(t / "run"),
                                                           "--max-steps", "1"]),
    "train --teacher": lambda c, t: train.main(QUICK + ["--teacher", str(c), "--out", str(t / "taught"),
                                                        "--max-steps", "1"]),
    "train --eval-only": lambda c, t: train.main(["--eval-only", "--checkpoint", str(c), "--eval-split",
                                                  "validation[:2]"]),
    "infer": lambda c, t: __import__("infer").main(__import__("infer").get_args(
        ["--checkpoint", str(c), str(t / "photo.png"), "--out", str(t / "masks")])),
    "export": lambda c, t: __import__("export").main(["--checkpoint", str(c), "--out", str(t / "exported")]),
    "explain": lambda c, t: __import__("explain").main(["--checkpoint", str(c), str(t / "photo.png"), "--out",
                                                         str(t / "explained")]),
    "convert": lambda c, t: __import__("convert").main([str(c), "--to", "hf", "--out", str(t / "converted")]),
    "serve": lambda c, t: run_main(lambda: __import__("serve").serve(__import__("serve").get_args(
        ["--checkpoint", str(c), "--port", "0"]))),
    "app": lambda c, t: run_main(lambda: __import__("app").build(__import__("app").get_args(
        ["--checkpoint", str(c)]))),
    "pretrain --model": lambda c, t: __import__("pretrain").main(PRETRAIN + ["--model", str(c / "config.json"),
                                                                             "--out", str(t / "pre")]),
}  # (--resume, with a run's saved settings: below for pretrain.py; train.py's in tests/test_architecture.py and
#    tests/test_finetune.py)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_a_checkpoint_naming_a_module_imports_nothing_without_trust_code(entry, planted_checkpoint, tmp_path,
                                                                         capsys):
    """Only the command line (or --trust-code) makes code run: every entry point refuses in one line, and the
    planted module is never imported."""
    import sys
    code = ENTRY_POINTS[entry](planted_checkpoint, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and "Traceback" not in "\n".join(err), err
    assert "names code from outside this project (decoder planted_part:Head)" in err[-1], err[-1]
    assert "--trust-code" in err[-1]
    assert not (tmp_path / "imported").exists() and "planted_part" not in sys.modules


def test_resuming_a_pretraining_run_whose_files_name_a_module_imports_nothing(planted_checkpoint, tmp_path, capsys):
    """pretrain.py --resume of a run whose config.json and training_args.json were made to name a module: the
    saved run is a file's word, not the user's; refused in one line, nothing imported."""
    import sys

    import pretrain
    assert pretrain.main(PRETRAIN + ["--out", str(tmp_path / "pre")]) == 0
    resumed = tmp_path / "pre" / "checkpoint-1"
    for name, key in (("config.json", "segformer_parts"), ("training_args.json", None)):
        content = json.loads((resumed / name).read_text())
        content.update({key: {"attention": "planted_part:Head"}} if key else {"attention": "planted_part:Head"})
        (resumed / name).write_text(json.dumps(content))
    capsys.readouterr()
    assert pretrain.main(PRETRAIN + ["--resume", str(resumed), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "names code from outside this project (attention planted_part:Head)" in err[-1] and "--trust-code" in err[-1]
    assert not (tmp_path / "imported").exists() and "planted_part" not in sys.modules


def test_the_planted_module_is_imported_where_the_user_says_trust_code(planted_checkpoint, tmp_path, capsys):
    """The marker works: with --trust-code the module is imported; its Head, which takes none of what the
    decoder seam passes, fails in one line naming the part (it was a TypeError traceback deep in the build)."""
    import infer
    assert infer.main(infer.get_args(["--checkpoint", str(planted_checkpoint), str(tmp_path / "photo.png"), "--out",
                                      str(tmp_path / "masks"), "--trust-code"])) == 2
    assert (tmp_path / "imported").read_text() == "imported"
    err = capsys.readouterr().err.strip()
    assert err == ("error: decoder planted_part:Head: its constructor must take (config, channels (the encoder's "
                   "widths per stage)), as the decoder seam calls it; Head has no __init__ of its own, and "
                   "nn.Module's takes no arguments"), err


# ---- numbers that must never be silently wrong -------------------------------------------------------

def test_validation_carved_from_a_single_split_is_never_trained_on(tmp_path):
    masks = [np.full((20, 24), i % 3 + 1) for i in range(10)]
    flat = write_flat_folder(tmp_path / "flat", masks)
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature
    pairs = {"image": [random_image(20, 24, seed=i) for i in range(10)],
             "annotation": [Image.fromarray(m.astype(np.uint8)) for m in masks]}
    dataset = Dataset.from_dict(pairs, features=Features({"image": ImageFeature(), "annotation": ImageFeature()}))
    dataset.to_parquet(str(tmp_path / "one.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    for source in (flat, tmp_path / "one.parquet", tmp_path / "saved"):
        trained = open_source(str(source), "train", train=True).names()
        evaluated = open_source(str(source), "validation", train=False).names()
        assert len(trained) == 8 and len(evaluated) == 2, source
        assert not set(trained) & set(evaluated), source
    # and train.py refuses splits that share images
    ade = tmp_path / "ade"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
    for i in range(4):
        random_image(32, 32, seed=i).save(ade / "images" / "training" / f"{i}.png")
        Image.fromarray(np.full((32, 32), 1, np.uint8)).save(ade / "annotations" / "training" / f"{i}.png")
    with pytest.raises(ConfigError, match=r"4 of the 4 validation samples .* are also training samples"):
        quick(tmp_path / "run", "--data", str(ade), "--train-split", "training", "--eval-split", "training")


def corrupt_weights_after_step(monkeypatch, bad_step):
    """Make the weights non-finite after an optimizer step whose loss was finite (what --lr 1e6 does)."""
    original = train.train_step

    def step_then_corrupt(run, micro_batches):
        result = original(run, micro_batches)
        if run.loop.step == bad_step:
            with torch.no_grad():
                run.raw_model.encoder.stages[2].blocks[0].attn.q.weight.fill_(float("inf"))
        return result
    monkeypatch.setattr(train, "train_step", step_then_corrupt)


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    corrupt_weights_after_step(monkeypatch, bad_step=2)
    with pytest.raises(train.Diverged, match=r"weights are not finite after step 2 \(encoder\.stages\.2\.blocks"
                                                 r"\.0\.attn\.q\.weight\); stopping without saving: the last "
                                                 r"checkpoint on disk is .*checkpoint-1"):
        quick(tmp_path / "a", "--max-steps", "3", "--eval-every", "1")
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-1"]
    best = load_file(tmp_path / "a" / "best" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in best.values())
    corrupt_weights_after_step(monkeypatch, bad_step=1)
    with pytest.raises(train.Diverged, match=r"no checkpoint was written in"):
        quick(tmp_path / "b", "--max-steps", "3")


def test_a_batch_with_every_pixel_ignored_contributes_nothing(tmp_path, monkeypatch):
    from segformer import segmentation_loss
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert segmentation_loss(logits, torch.full((2, 32, 32), 255)).isnan()  # why the loop must step around it

    command = train.parse_command_line(QUICK + ["--out", str(tmp_path), "--max-steps", "1"])
    run = train.build_run(command, rank=0, world_size=1, device=torch.device("cpu"))
    batch = next(iter(run.train_loader))
    batch["labels"][:] = 255
    gradients = []
    step = run.scaler.step
    monkeypatch.setattr(run.scaler, "step", lambda optimizer: (gradients.extend(
        p.grad.abs().max().item() for g in optimizer.param_groups for p in g["params"]), step(optimizer))[1])
    loss, _ = train.train_step(run, [batch])
    run.log.close()
    assert loss == 0.0 and max(gradients) == 0.0
    assert run.meter.unlabelled_batches == 1 and run.meter.trained_batches == 0


def test_a_run_with_unlabelled_crops_finishes_and_reports_them(tmp_path, capsys):
    train_masks = [np.zeros((32, 32))] * 3 + [np.full((32, 32), 2)] * 5  # 0 = unlabelled: three crops of nothing
    folder = write_ade_folder(tmp_path / "ade", train_masks, [np.full((32, 32), 2)] * 2)
    result = quick(tmp_path / "run", "--data", str(folder), "--train-split", "training", "--batch-size", "1",
                   "--max-steps", "8")
    assert result["unlabelled_batches"] >= 1 and result["step"] == 8
    assert f"{result['unlabelled_batches']} training batches had no labelled pixel" in capsys.readouterr().out
    assert all(np.isfinite(r["loss"]) for r in read_log(tmp_path / "run") if "mean_iou" not in r)


def test_a_dataset_json_whose_labels_changed_since_the_run_started_is_not_resumed(tmp_path, capsys):
    """An ignored value or a label_map entry added to dataset.json between a run and its --resume went on
    without a word, and the mIoU jumped; now one line naming what changed, and the same file resumes."""
    folder = write_ade_folder(tmp_path / "ade", [np.full((32, 32), 2)] * 4, [np.full((32, 32), 1)] * 2)
    manifest = {"classes": ["wall", "floor", "sky"], "reduce_labels": True}
    (folder / "dataset.json").write_text(json.dumps(manifest))
    run = ["--data", str(folder), "--train-split", "training", "--eval-split", "validation"]
    quick(tmp_path / "run", *run, "--max-steps", "2")
    for change, said in (({"ignore_index": [3]}, "ignore was [], is now [3]"),
                         ({"label_map": {"4": 1}}, "label_map was [], is now [[4, 1]]")):
        (folder / "dataset.json").write_text(json.dumps(manifest | change))
        assert train.main(["--resume", str(tmp_path / "run" / "checkpoint-1"), "--max-steps", "3"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {folder}: the labels changed since {tmp_path / 'run' / 'checkpoint-1'} was "
                              f"trained ({said})") and "--pretrained" in err, err
    (folder / "dataset.json").write_text(json.dumps(manifest))
    assert train.main(["--resume", str(tmp_path / "run" / "checkpoint-2"), "--max-steps", "3"]) == 0


def test_a_class_id_that_is_the_ignore_index_is_refused_not_silently_ignored(tmp_path, capsys):
    """16-bit label maps hold class ids past 255, and a run of 300 classes trained: class 255, the ignore index,
    was never trained or scored, without a word. Refused by train.py and the doctor; 255 classes still train."""
    from data.__main__ import main as doctor
    for split in ("train", "val"):
        (tmp_path / "img_dir" / split).mkdir(parents=True)
        (tmp_path / "ann_dir" / split).mkdir(parents=True)
        for i in range(2):
            random_image(16, 16, seed=i).save(tmp_path / "img_dir" / split / f"a{i}.png")
            Image.fromarray(np.full((16, 16), 200 + 50 * i, np.uint16)).save(tmp_path / "ann_dir" / split / f"a{i}.png")
    said = (r"--num-labels 300: 300 classes; training and evaluation count classes 0..254, 255 being the ignore "
            r"index: class 255 \('LABEL_255'\) would never be trained or scored")
    with pytest.raises(ConfigError, match=said):
        train.execute(["--data", str(tmp_path), "--num-labels", "300", "--max-steps", "1", "--size", "32",
                       "--batch-size", "2", "--out", str(tmp_path / "run")])
    assert doctor([str(tmp_path), "--num-labels", "300"]) == 2
    assert "class 255 ('LABEL_255') would never be trained" in capsys.readouterr().err
    assert doctor([str(tmp_path), "--num-labels", "255"]) == 0  # 200 and 250: classes of 255


def test_skip_bad_with_every_sample_bad_fails_naming_the_reasons(tmp_path):
    folder = write_flat_folder(tmp_path / "data", [np.full((32, 32), 1)] * 10)
    for image in (folder / "images").iterdir():
        image.write_bytes(b"not a png")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"no training sample reached the model "
                                                                   r"\(\d+ skipped as bad.*cannot decode image"):
        quick(tmp_path / "run", "--data", str(folder), "--num-labels", "2", "--skip-bad", "--max-steps", "2")
    assert not (tmp_path / "run" / "best").exists()


def test_one_label_trains_the_binary_head_on_0_1_masks(tmp_path):
    masks = [np.pad(np.ones((16, 16)), 8) for _ in range(10)]  # a foreground square on background
    folder = write_flat_folder(tmp_path / "data", masks)
    result = quick(tmp_path / "run", "--data", str(folder), "--num-labels", "1", "--no-reduce-labels",
                   "--max-steps", "2", "--eval-every", "2")
    assert len(result["per_category_iou"]) == 2  # background and the one label
    model = SegFormer.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert model.config.num_labels == 1
    random_image(40, 40).save(tmp_path / "x.png")
    assert infer.main(infer.get_args(["--checkpoint", str(tmp_path / "run" / "checkpoint-2"), str(tmp_path / "x.png"),
                                      "--out", str(tmp_path / "pred")])) == 0
    segments = json.loads((tmp_path / "pred" / "x.json").read_text())["segments"]
    assert {s["label"] for s in segments} <= {"background", "LABEL_0"}
    assert set(np.unique(np.asarray(Image.open(tmp_path / "pred" / "x_mask.png")))) <= {0, 1}


# ---- nothing lost ------------------------------------------------------------------------------------------

def test_a_second_run_on_a_folder_in_use_fails_naming_the_holder(tmp_path):
    lock = RunLock(tmp_path / "run")
    try:
        with pytest.raises(RunLocked, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}\)"):
            quick(tmp_path / "run", "--max-steps", "1")
    finally:
        lock.release()
    quick(tmp_path / "run", "--max-steps", "1")  # free again


def test_resuming_into_a_folder_that_holds_another_run_is_refused(tmp_path):
    quick(tmp_path / "a", "--max-steps", "1")
    quick(tmp_path / "b", "--max-steps", "1", "--seed", "1")
    before = (tmp_path / "b" / "checkpoint-1" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds another run \(checkpoint-1, best\).*--overwrite"):
        train.execute(["--resume", str(tmp_path / "a" / "checkpoint-1"), "--out", str(tmp_path / "b"),
                    "--max-steps", "2"])
    assert (tmp_path / "b" / "checkpoint-1" / "model.safetensors").read_bytes() == before


def make_dir(path, text):
    path.mkdir()
    (path / "model.safetensors").write_text(text)
    return path


@pytest.mark.parametrize("kill", ["before the swap", "after the swap"])
def test_best_is_complete_at_every_instant(tmp_path, monkeypatch, kill):
    best = make_dir(tmp_path / "best", "old")
    new = make_dir(tmp_path / ".best.x.tmp", "new")
    exchange = run_folder._exchange

    def killed_exchange(a, b):
        if kill == "after the swap":
            exchange(a, b)
        raise KeyboardInterrupt  # the process dies here
    monkeypatch.setattr(run_folder, "_exchange", killed_exchange)
    with pytest.raises(KeyboardInterrupt):
        run_folder.replace_dir(new, best)
    assert (best / "model.safetensors").read_text() == ("new" if kill == "after the swap" else "old")
    run_folder.clean_up_after_a_kill(tmp_path)  # the next run: leftovers go, best stays
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_without_an_atomic_swap_the_next_run_puts_best_back(tmp_path, monkeypatch):
    best = make_dir(tmp_path / "best", "old")
    new = make_dir(tmp_path / ".best.x.tmp", "new")
    monkeypatch.setattr(run_folder, "_exchange", lambda a, b: False)  # a file system that cannot swap
    rename = type(best).rename

    def killed_second_rename(self, target):
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt  # killed between the two renames
        return rename(self, target)
    monkeypatch.setattr(type(best), "rename", killed_second_rename)
    with pytest.raises(KeyboardInterrupt):
        run_folder.replace_dir(new, best)
    monkeypatch.undo()
    assert not best.exists()
    assert run_folder.clean_up_after_a_kill(tmp_path)[0].startswith(f"restored {best}")
    assert (best / "model.safetensors").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best"]


def test_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, run_folder.replace_dir
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(run_folder, "replace_dir", lambda new, target: (events.append(("rename", str(target))),
                                                                          replace(new, target))[1])
    quick(tmp_path / "run", "--max-steps", "1", "--save-every", "100")
    renamed = events.index(("rename", str(tmp_path / "run" / "checkpoint-1")))
    written = {os.path.basename(path) for kind, path in events[:renamed] if kind == "fsync"}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "training_state.pt",
            "training_args.json"} <= {name.split(".tmp")[0].lstrip(".").rsplit(".", 1)[0] if name.endswith(".tmp")
                                      else name for name in written} | written
    assert ("fsync", str(tmp_path / "run")) in events[renamed:]  # the folder, after the rename


def test_leftovers_of_killed_writes_are_removed_by_the_next_run(tmp_path, capsys):
    leftover = tmp_path / "run" / ".checkpoint-3.k2j4.tmp"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    quick(tmp_path / "run", "--max-steps", "1")
    assert not leftover.exists()
    assert "removed .checkpoint-3.k2j4.tmp (an unfinished write)" in capsys.readouterr().out


def test_sigterm_saves_after_the_step_and_exits_143(tmp_path, monkeypatch):
    original = train.segmentation_loss

    def terminated_loss(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(train, "segmentation_loss", terminated_loss)
    assert train.main(QUICK + ["--out", str(tmp_path), "--max-steps", "5", "--save-every", "100"]) == 143
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import segformer.files
    write_all = segformer.files._write_all

    def full_on_second_checkpoint(path, data):  # every checkpoint file goes through this one write
        if ".checkpoint-2." in str(path) and "training_state" in str(path):
            write_all(path, data[:1000])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_all(path, data)
    monkeypatch.setattr(segformer.files, "_write_all", full_on_second_checkpoint)
    with pytest.raises(CheckpointError, match=r"no space left on the device while writing .*/checkpoint-2/"
                                              r"training_state\.pt; the previous checkpoint "
                                              r".*checkpoint-1 is intact$"):
        quick(tmp_path, "--max-steps", "3")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".check", "check"))) == ["checkpoint-1"]
    SegFormer.from_pretrained(tmp_path / "checkpoint-1")  # intact


def test_a_disk_that_fills_up_between_checkpoints_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """The log, a plot or an evaluation written to a full disk gave a raw OSError traceback; now one line naming
    the file and the last checkpoint, which --resume continues from with the log cut back to it."""
    from training import run_log
    write = run_log.json.dumps

    def full_at_step_3(record, **options):  # the log line of step 3 (json.dumps serves every JSON writer)
        if isinstance(record, dict) and record.get("step") == 3 and "loss" in record:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(record, **options)
    monkeypatch.setattr(run_log.json, "dumps", full_at_step_3)
    code = train.main(QUICK + ["--out", str(tmp_path), "--max-steps", "4", "--save-every", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    err = err.splitlines()[-1].split("\r")[-1]  # after the progress bar
    assert err.startswith(f"error: no space left on device while writing {tmp_path / 'metrics.jsonl'}; the last "
                          f"checkpoint on disk is {tmp_path / 'checkpoint-2'}, intact"), err
    monkeypatch.setattr(run_log.json, "dumps", write)
    assert train.main(["--resume", str(tmp_path / "checkpoint-2")]) == 0
    assert [r["step"] for r in read_log(tmp_path) if "mean_iou" not in r] == [1, 2, 3, 4]


def test_folders_named_like_checkpoints_are_not_the_runs(tmp_path):
    (tmp_path / "checkpoint-final").mkdir(parents=True)
    quick(tmp_path, "--max-steps", "3", "--save-total-limit", "1")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-final"]


def test_resuming_from_an_earlier_checkpoint_reports_each_step_once(tmp_path):
    quick(tmp_path, "--max-steps", "4", "--save-total-limit", "4")
    straight = read_log(tmp_path)
    train.execute(["--resume", str(tmp_path / "checkpoint-2")])
    resumed = read_log(tmp_path)
    assert [(r["step"], "mean_iou" in r) for r in resumed] == [(r["step"], "mean_iou" in r) for r in straight] == \
        [(1, False), (2, False), (3, False), (4, False), (4, True)]
    def numbers(records):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]
    assert numbers(resumed) == numbers(straight)  # the same numbers: the resumed steps are the straight run's


# ---- infer.py ---------------------------------------------------------------------------------------------

@pytest.fixture()
def saved_model(tmp_path):
    torch.manual_seed(0)
    SegFormer.from_variant("b0", num_labels=3).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_infer_outputs_are_atomic_and_an_interrupted_image_is_redone(saved_model, tmp_path, monkeypatch, capsys):
    random_image(30, 40).save(tmp_path / "a.png")
    random_image(30, 40, seed=1).save(tmp_path / "b.png")
    args = ["--checkpoint", saved_model, str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--size", "32",
            "--out", str(tmp_path / "out")]
    overlay = infer.overlay

    def crash_on_a(image, label_map, *rest):
        if image.size == (40, 30) and not (tmp_path / "out" / "b_mask.png").exists():
            raise MemoryError("out of memory drawing the overlay")
        return overlay(image, label_map, *rest)
    monkeypatch.setattr(infer, "overlay", crash_on_a)
    assert infer.main(infer.get_args(args)) == 1
    assert "a.png: MemoryError: out of memory drawing the overlay" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_mask.png", "b.json", "b_mask.png",
                                                                    "b_overlay.png"]  # no temporaries, b done
    monkeypatch.setattr(infer, "overlay", overlay)
    assert infer.main(infer.get_args(args)) == 0  # a is redone (not 'already done'), b kept
    assert "1 file(s) segmented" in capsys.readouterr().out and (tmp_path / "out" / "a.json").is_file()


def test_infer_images_sharing_a_stem_get_their_own_outputs(saved_model, tmp_path):
    random_image(30, 40).save(tmp_path / "in" / "x.png") if (tmp_path / "in").mkdir() is None else None
    random_image(30, 40, seed=5).save(tmp_path / "in" / "x.jpg")
    random_image(30, 40).save(tmp_path / "in" / "._x.png")  # macOS AppleDouble: not an image to segment
    assert infer.main(infer.get_args(["--checkpoint", saved_model, str(tmp_path / "in"), "--size", "32",
                                      "--out", str(tmp_path / "out")])) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["x_jpg.json", "x_jpg_mask.png", "x_jpg_overlay.png", "x_png.json", "x_png_mask.png",
                     "x_png_overlay.png"]


def test_infer_unwritable_out_is_one_line(saved_model, tmp_path, capsys):
    random_image(30, 40).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("a file, not a folder")
    assert infer.main(infer.get_args(["--checkpoint", saved_model, str(tmp_path / "a.png"),
                                      "--out", str(tmp_path / "file" / "out")])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'file' / 'out'}: cannot write there") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [(["--alpha", "2"], "--alpha: must be in 0.0..1.0"),
                                           (["--window", "0"], "--window: must be in 32..8192"),
                                           (["--scales", "0"], "--scales: must be in 0.1..8.0"),
                                           (["--mode", "slide", "--window", "64", "--stride", "65"],
                                            "--stride: must be at most --window")])
def test_infer_numeric_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        infer.get_args(["x.png"] + argv)
    assert message in capsys.readouterr().err


# ---- files that are not what they claim ------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"", r"not a training state this project wrote"),
    ("truncate", r"not a training state this project wrote"),
    ({"optimizer": {}}, r"no 'scheduler' in it"),
    (torch.zeros(3), r"expected a dict of training state, got Tensor"),
])
def test_a_broken_training_state_is_named(tmp_path, content, message):
    quick(tmp_path / "run", "--max-steps", "1")
    path = tmp_path / "run" / "checkpoint-1" / "training_state.pt"
    if content == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=rf"training_state\.pt: .*{message}"):
        train.execute(["--resume", str(tmp_path / "run" / "checkpoint-1")])


def test_a_broken_training_args_is_named(tmp_path):
    quick(tmp_path / "run", "--max-steps", "1")
    path = tmp_path / "run" / "checkpoint-1" / "training_args.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(ConfigError, match=r"training_args\.json: not valid JSON"):
        train.execute(["--resume", str(tmp_path / "run" / "checkpoint-1")])


@pytest.mark.parametrize("edit, message", [
    ({"num_labels": -3}, r"key 'num_labels' must be a whole number >= 1, got -3"),
    ({"num_labels": "seven"}, r"key 'num_labels' must be a whole number >= 1, got 'seven'"),
    ({"depths": [2, 2, 2]}, r"depths has 3 entries, expected one per stage \(4\)"),
    ({"hidden_sizes": "wide"}, r"key 'hidden_sizes' must be a list of whole numbers"),
    ({"id2label": ["a", "b"]}, r"key 'id2label' must map class ids to names"),
])
def test_nonsense_in_config_json_names_the_file_and_key(hf_b0_dir, tmp_path, edit, message):
    config = json.loads((hf_b0_dir / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((hf_b0_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        SegFormer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        SegFormer.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"size": {"height": "abc", "width": 64}}, r"key 'size' must be \{\"height\": H, \"width\": W\} \(or an "),
    ({"size": -5}, r"key 'size' must be .* of positive whole numbers, got -5"),
    ({"size": 10**9}, r"key 'size' must be an input size of at most [\d,]+ pixels"),
    ({"do_reduce_labels": "yes"}, r"key 'do_reduce_labels' must be true or false, got 'yes'"),
    ({"image_mean": [0.5, 0.5, 0.5]}, r"key 'image_mean' must be ImageNet's \[0.485, 0.456, 0.406\], with which"),
    ({"image_std": [0, 0, 0]}, r"key 'image_std' must be ImageNet's"),
    ({"do_normalize": False}, r"key 'do_normalize' must be true: this project normalises every image"),
    ({"rescale_factor": 1.0}, r"key 'rescale_factor' must be 1/255"),
    ({"num_bands": "x"}, r"key 'num_bands' must be given with \"do_rescale\": false"),
    ({"do_rescale": False, "num_bands": True}, r"key 'num_bands' must be the images' band count, 1..64, got True"),
    ({"do_rescale": False, "num_bands": 2}, r"key 'image_mean' must be 2 finite numbers \(one per band\)"),
])
def test_nonsense_in_preprocessor_config_names_the_file_and_key(tmp_path, edit, message):
    """A size that was not a positive whole number fell back to the default input size without a word, a
    reduction that was not a boolean was taken as none, an RGB normalisation other than ImageNet's (which
    inference applies) was ignored, and 10^9 x 10^9 was an allocation of exabytes at the first image."""
    from transformers import SegformerImageProcessor

    from segformer.checkpoint import read_preprocessor
    SegformerImageProcessor().save_pretrained(tmp_path)  # the reference's own file reads as it says
    assert read_preprocessor(tmp_path / "preprocessor_config.json") == dict(size=512, reduce_labels=False, bands=None)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config | edit))
    with pytest.raises(CheckpointError, match=rf"preprocessor_config\.json: {message}"):
        read_preprocessor(tmp_path / "preprocessor_config.json")


@pytest.mark.parametrize("content, said", [
    ({"0": "wall", "1": "wall"}, r"the name 'wall' is given to classes \[0, 1\]; a name is one class"),
    ({"0": "wall", "1": " "}, r"class 1 is named ' '; every class needs a name"),
    ({"0": "wall", "1": 7}, r"class 1 is named 7; every class needs a name \(a string\)"),
    ({"0": "wall", "2": "sky"}, r"ids must be 0..1 without gaps"),
])
def test_an_id2label_file_naming_a_class_twice_or_not_at_all_is_refused(tmp_path, content, said):
    """--id2label with a name twice made one class vanish from label2id (its pixels scored as the other's), and a
    number or blank was taken as a name; the same reader checks an exported graph's id2label.json."""
    from segformer.labels import read_id2label
    from segformer.runtimes.graph import GraphModel
    (tmp_path / "id2label.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"id2label\.json: " + said):
        read_id2label(tmp_path / "id2label.json")
    with pytest.raises(CheckpointError, match=r"id2label\.json: " + said):
        GraphModel(tmp_path / "model.onnx")


def test_weights_num_batches_tracked_may_be_missing_but_not_integers_or_nans(hf_b0_dir, tmp_path):
    weights = load_file(hf_b0_dir / "model.safetensors")
    without = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    save_file(without, tmp_path / "converted.safetensors")
    SegFormer.from_pretrained(tmp_path / "converted.safetensors")  # as PyTorch's load_state_dict accepts it
    ints = dict(weights, **{"decode_head.linear_fuse.weight": weights["decode_head.linear_fuse.weight"].long()})
    save_file(ints, tmp_path / "ints.safetensors")
    with pytest.raises(WeightLayoutError, match=r"integer where floats belong: decoder\.fuse\.weight \(torch\.int64\)"):
        SegFormer.from_pretrained(tmp_path / "ints.safetensors")
    nans = dict(weights)
    nans["segformer.encoder.block.1.0.mlp.dense1.bias"] = torch.full_like(nans["segformer.encoder.block.1.0.mlp."
                                                                                "dense1.bias"], float("nan"))
    save_file(nans, tmp_path / "nans.safetensors")
    with pytest.raises(WeightLayoutError, match=r"not finite \(NaN or inf\): encoder\.stages\.1\.blocks\.0\.ffn\.fc1\.bias"):
        SegFormer.from_pretrained(tmp_path / "nans.safetensors")


def test_folder_oddities_are_handled_per_file(tmp_path):
    folder = write_flat_folder(tmp_path / "data", [np.full((20, 24), 1)] * 5)
    (folder / "images" / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS metadata twins
    (folder / "annotations" / "._000.png").write_bytes(b"\0\5\26\7")
    (folder / "images" / ".DS_Store").write_bytes(b"\0")
    (folder / "images" / "003.png").unlink()
    (folder / "images" / "003.png").symlink_to(folder / "images" / "003.png")  # a symlink loop
    (folder / "images" / "albums.jpg").mkdir()  # a directory named like an image: no split, no sample
    samples = open_source(str(folder), "train", train=True, test_size=0)
    assert len(samples) == 5
    dataset = build_dataset(samples, num_labels=2, size=32)
    bad = [i for i in range(5) if "003" in samples.names()[i]][0]
    with pytest.raises(DataError, match=r"003\.png: cannot read it \(Too many levels of symbolic links\)"):
        dataset[bad]
    skipping = build_dataset(samples, num_labels=2, size=32, skip_bad=True)
    with pytest.warns(UserWarning, match="003.png"):
        batch = next(iter(build_loader(skipping, batch_size=5, shuffle=False)))
    assert len(batch["skipped"]) == 1 and batch["pixel_values"].shape[0] == 4


def test_parquet_rows_and_files_that_are_not_what_they_claim(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    image = {"bytes": None, "path": str(tmp_path / "gone.png")}
    table = pa.table({"image": [image], "annotation": [image]})
    pq.write_table(table, tmp_path / "paths.parquet")
    samples = open_source(str(tmp_path / "paths.parquet"), "train", train=True, test_size=0)
    with pytest.raises(DataError, match=r"paths\.parquet row 0 column 'image': .*gone\.png: cannot read it"):
        samples[0]
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"garbage\.parquet: not a readable parquet file"):
        open_source(str(tmp_path / "garbage.parquet"), "train", train=True)
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.parquet: not a readable parquet file"):
        open_source(str(tmp_path / "*.parquet"), "train", train=True)


# ---- nothing lost, round two ------------------------------------------------------------------------------

def ade_data(root, *, train=6, val=2, side=32):
    """A small ADE-layout folder with two classes (values 1 and 2)."""
    masks = [np.where(np.indices((side, side))[1] < side // 2, 1, 2) for _ in range(train + val)]
    return write_ade_folder(root, masks[:train], masks[train:])


FOLDER = ["--train-split", "training", "--eval-split", "validation", "--num-labels", "2", "--batch-size", "2",
          "--size", "32", "--warmup-steps", "0", "--log-every", "1", "--no-plots"]


def test_a_moved_run_resumes_in_its_new_folder(tmp_path, monkeypatch):
    """1. mv runs/a runs/b, then --resume runs/b/checkpoint-2: the run goes on in runs/b, from any working
    directory, with the relative --data it was started with."""
    ade_data(tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path / "work")
    train.execute(FOLDER + ["--data", "data", "--out", "runs/a", "--max-steps", "2", "--eval-every", "2",
                            "--save-every", "2"])
    (tmp_path / "work" / "runs" / "a").rename(tmp_path / "work" / "runs" / "b")
    monkeypatch.chdir(tmp_path)  # elsewhere
    train.execute(["--resume", "work/runs/b/checkpoint-2", "--max-steps", "3"])
    assert not (tmp_path / "work" / "runs" / "a").exists() and not (tmp_path / "runs").exists()
    assert (tmp_path / "work" / "runs" / "b" / "checkpoint-3").is_dir()
    assert [r["step"] for r in read_log(tmp_path / "work" / "runs" / "b")][-1] == 3
    settings = json.loads((tmp_path / "work" / "runs" / "b" / "checkpoint-3" / "training_args.json").read_text())
    assert settings["out"] == str(tmp_path / "work" / "runs" / "b") and settings["data"] == str(tmp_path / "work" /
                                                                                                 "data")
    # the same data folder, spelt another way, is the same setting
    train.execute(["--resume", "work/runs/b/checkpoint-3", "--max-steps", "4", "--data", str(tmp_path / "work" /
                                                                                             "data")])
    assert (tmp_path / "work" / "runs" / "b" / "checkpoint-4").is_dir()


def test_a_new_run_starts_a_new_log_and_a_torn_last_record_is_dropped(tmp_path, monkeypatch, capsys):
    """2. A run killed before its first checkpoint leaves a log the next run must not append to; a record
    torn by a power loss must not stop --resume; the log is fsynced at each checkpoint."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    (tmp_path / "evaluations" / "step-7").mkdir(parents=True)
    (tmp_path / ".lock").write_text("pid 1 on host\n")  # the killed run's lock file: a run of ours was here
    quick(tmp_path, "--max-steps", "2")
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 2] and all(r["loss"] != 9.0 for r in read_log(tmp_path))
    assert not (tmp_path / "evaluations" / "step-7").exists()
    with open(tmp_path / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "lo')  # the power went out here
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    train.execute(["--resume", str(tmp_path / "checkpoint-2"), "--max-steps", "3"])
    assert "its last record was cut short" in capsys.readouterr().out
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 2, 3, 3]  # each step once, and its evaluation
    assert str(tmp_path / "metrics.jsonl") in synced
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damaged inside: named
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl line 2: not a JSON record"):
        train.execute(["--resume", str(tmp_path / "checkpoint-3"), "--max-steps", "4"])


def test_bad_validation_files_are_found_before_training(tmp_path):
    """3. A validation annotation of the wrong size, or with a value that is not a class, stops the run
    before its first step, naming the file, instead of at the first evaluation."""
    folder = ade_data(tmp_path / "data")
    bad = folder / "annotations" / "validation" / "ADE_validation_00000001.png"
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(bad)
    steps = []
    with pytest.raises(DataError, match=r"1 bad sample\(s\) in .*ADE_validation_00000001\.jpg: label values \[8\] "
                                        r"are not class ids 0\.\.1 .*python -m data"):
        train.execute(FOLDER + ["--data", str(folder), "--out", str(tmp_path / "run"), "--max-steps", "4"])
    assert not list((tmp_path / "run").glob("checkpoint-*")) and steps == []
    Image.fromarray(np.full((20, 32), 1, np.uint8)).save(bad)
    with pytest.raises(DataError, match=r"ADE_validation_00000001\.png: the annotation is 32x20 \(WxH\) but its "
                                        r"image .*ADE_validation_00000001\.jpg is 32x32"):
        train.execute(FOLDER + ["--data", str(folder), "--out", str(tmp_path / "run"), "--max-steps", "4"])


def test_a_file_that_goes_bad_during_the_run_costs_no_trained_step(tmp_path, monkeypatch):
    """3. Never drop trained steps on a data error: the steps before it are saved, and the run continues
    from them once the file is mended."""
    folder = ade_data(tmp_path / "data")
    bad = folder / "annotations" / "validation" / "ADE_validation_00000001.png"
    good = bad.read_bytes()
    original = train.evaluate

    def breaks_then_evaluates(*args, **kwargs):
        bad.write_bytes(b"not a png any more")
        return original(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", breaks_then_evaluates)
    with pytest.raises(DataError, match=r"ADE_validation_00000001\.png: cannot decode image.*the 3 steps trained are "
                                        r"saved in .*checkpoint-3: fix the file, then --resume"):
        train.execute(FOLDER + ["--data", str(folder), "--out", str(tmp_path / "run"), "--max-steps", "6",
                                "--eval-every", "3", "--save-every", "100"])
    monkeypatch.undo()
    bad.write_bytes(good)
    train.execute(["--resume", str(tmp_path / "run" / "checkpoint-3")])
    assert (tmp_path / "run" / "checkpoint-6").is_dir()


def test_resuming_from_best_does_not_overwrite_newer_checkpoints(tmp_path, capsys):
    """4. best/ is an earlier step than the run's newest checkpoint: refused, saying how to go on; an
    earlier checkpoint-<step> rewinds, and says so."""
    quick(tmp_path, "--max-steps", "4", "--eval-every", "1", "--save-total-limit", "4")
    best_step = torch.load(tmp_path / "best" / "training_state.pt", weights_only=True)["step"]
    newest = (tmp_path / "checkpoint-4" / "model.safetensors").read_bytes()
    if best_step < 4:
        with pytest.raises(ConfigError, match=rf"--resume .*best: it holds step {best_step}, but .* has newer "
                                              rf"checkpoints .*checkpoint-4.*--resume .*checkpoint-4, or branch"):
            train.execute(["--resume", str(tmp_path / "best")])
        assert (tmp_path / "checkpoint-4" / "model.safetensors").read_bytes() == newest
    capsys.readouterr()
    train.execute(["--resume", str(tmp_path / "checkpoint-2"), "--max-steps", "3"])  # a shorter timeline
    assert "rewinding to step 2: checkpoint-3, checkpoint-4 removed (the steps after it are trained again) and " \
           "the log after step 2 cut" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert max(r["step"] for r in read_log(tmp_path)) == 3  # the abandoned step 4 is in neither
    train.execute(["--resume", str(tmp_path / "best"), "--out", str(tmp_path / "branch"), "--max-steps", "5"])
    assert (tmp_path / "branch" / "checkpoint-5").is_dir()


def test_a_training_set_that_changed_is_not_resumed_silently(tmp_path):
    """5. Images added to (or taken from) the training folder: the saved data position would index
    another permutation."""
    folder = ade_data(tmp_path / "data")
    train.execute(FOLDER + ["--data", str(folder), "--out", str(tmp_path / "run"), "--max-steps", "2",
                            "--eval-every", "100", "--save-every", "2"])
    for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
        source = folder / kind / "training" / f"ADE_training_00000000{suffix}"
        (folder / kind / "training" / f"ADE_training_00000099{suffix}").write_bytes(source.read_bytes())
    with pytest.raises(ConfigError, match=r"the training split is not the one .*checkpoint-2 was trained on \(7 "
                                          r"samples now, 6 then\).*--pretrained"):
        train.execute(["--resume", str(tmp_path / "run" / "checkpoint-2"), "--max-steps", "4"])


def test_a_bad_image_in_a_worker_is_one_line_and_a_skipped_file_counts_once(tmp_path, capsys):
    """6. With workers, a corrupt image is one line (not the worker's traceback); --skip-bad counts a bad
    file once, however often it is read."""
    folder = write_flat_folder(tmp_path / "data", [np.full((32, 32), 1)] * 10)
    dataset = build_dataset(str(folder), "train", num_labels=2, size=32, train=True)
    bad = dataset.samples.names()[0]
    Path(bad).write_bytes(b"not a png")
    loader = build_loader(dataset, batch_size=2, num_workers=2, shuffle=False)
    with pytest.raises(DataError) as error:
        list(loader)
    assert str(error.value).count("\n") == 0 and f"{bad}: cannot decode image" in str(error.value)
    assert "Traceback" not in str(error.value)
    result = quick(tmp_path / "run", "--data", str(folder), "--train-split", "train", "--eval-split", "validation",
                   "--num-labels", "2", "--skip-bad", "--max-steps", "12", "--workers", "2", "--save-every", "100")
    assert result["skipped"] == 1 and "skipped 1 bad training sample(s)" in capsys.readouterr().out


def test_a_second_ctrl_c_and_bad_flags_of_every_script_are_one_line(tmp_path, monkeypatch, capsys, saved_model):
    """7. A second Ctrl-C stops at once with one line; export.py --out on a file and --device that the machine
    does not have are one line each, in every script."""
    original = train.segmentation_loss
    calls = {"n": 0}

    def two_interrupts(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(train, "segmentation_loss", two_interrupts)
    assert train.main(QUICK + ["--out", str(tmp_path / "run"), "--max-steps", "3"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted again: stopped without saving this step"
    import export
    (tmp_path / "file").write_text("x")
    assert export.main(["--checkpoint", saved_model, "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'file'}: a file is there; expected a folder\n"
    random_image(20, 20).save(tmp_path / "x.png")
    assert infer.main(infer.get_args(["--checkpoint", saved_model, str(tmp_path / "x.png"), "--device", "tpu"])) == 2
    assert capsys.readouterr().err == "error: --device tpu: not a device name; expected cpu\n"
    assert train.main(QUICK + ["--out", str(tmp_path / "r2"), "--device", "cuda:7"]) == 2
    assert "error: --device cuda:7: this machine has no cuda device" in capsys.readouterr().err


def test_the_doctor_names_the_file_of_a_size_mismatch(tmp_path, capsys):
    """8."""
    folder = write_flat_folder(tmp_path / "data", [np.full((32, 32), 1)] * 3)
    Image.fromarray(np.full((16, 32), 1, np.uint8)).save(folder / "annotations" / "001.png")
    import data.__main__ as doctor
    assert doctor.main([str(folder), "--num-labels", "2"]) == 1
    assert f"{folder / 'annotations' / '001.png'}: the annotation is 32x16 (WxH) but its image " \
        f"{folder / 'images' / '001.png'} is 32x32" in \
        capsys.readouterr().out


def test_class_weights_on_binary_data_are_refused_before_training(tmp_path, capsys):
    """9. One label is the binary head: class weights do not apply; refused when the settings are checked,
    and the doctor does not recommend them."""
    folder = write_flat_folder(tmp_path / "data", [np.pad(np.ones((16, 16)), 8)] * 10)
    with pytest.raises(ConfigError, match=r"--class-weights auto: one label trains the binary \(sigmoid\) head.*"
                                          r"--num-labels 2"):
        quick(tmp_path / "run", "--data", str(folder), "--num-labels", "1", "--no-reduce-labels",
              "--class-weights", "auto")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    import data.__main__ as doctor
    doctor.main([str(folder), "--num-labels", "1", "--no-reduce-labels"])
    assert "--class-weights auto" not in capsys.readouterr().out


@pytest.mark.parametrize("content, said", [
    ({"0": 2.0, "sky": 3.0}, r"'0' and 'sky' are both class 0; give it one weight"),
    ([0, 0, 0], r"every class weight is 0, so no pixel would count in the loss"),
    ([1, 2], r"2 class weights for 3 classes"),
    ({"sea": 1}, r"'sea' is not a class \(ids 0..2 or names\)"),
    ([1, -1, 1], r"the weight of class 1 \(wall\) must be a number >= 0, got -1"),
    ({"2": "heavy"}, r"the weight of class 2 \(road\) must be a number >= 0, got 'heavy'"),
])
def test_a_class_weights_file_that_says_two_things_or_nothing_is_refused(tmp_path, content, said):
    """A weight given by id and by name kept the later without a word; all zero made the loss 0/0 = NaN at step
    one; each is one line naming the file."""
    from data.stats import read_class_weights
    (tmp_path / "weights.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"weights\.json: " + said):
        read_class_weights(tmp_path / "weights.json", ["sky", "wall", "road"])
    (tmp_path / "weights.json").write_text(json.dumps({"wall": 2, "2": 0.5}))
    assert read_class_weights(tmp_path / "weights.json", ["sky", "wall", "road"]) == [1.0, 2.0, 0.5]


def test_class_names_are_spreadsheet_safe_in_the_csv_files(tmp_path):
    """10. A class named like a formula is written as text, as spreadsheet-safe CSV writers do."""
    import csv

    from training.tables import write_evaluation
    names = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "plain"]
    matrix = np.eye(5, dtype=np.int64)
    metrics = {"per_category_iou": np.ones(5), "per_category_accuracy": np.ones(5)}
    write_evaluation(tmp_path, matrix, names, metrics, draw=False)
    rows = list(csv.reader(open(tmp_path / "per_class.csv")))
    assert [row[0] for row in rows[1:]] == ["'=HYPERLINK(\"http://x\")", "'+1", "'-2", "'@SUM(A1)", "plain"]
    header = next(csv.reader(open(tmp_path / "confusion.csv")))
    assert header[1:] == [row[0] for row in rows[1:]]


def test_a_stop_during_evaluation_saves_without_waiting_for_it(tmp_path, monkeypatch, capsys):
    """11. SIGTERM during a long evaluation: the run saves within a batch, not after the whole evaluation
    (a SLURM or Kubernetes grace period is shorter than some evaluations)."""
    from training import evaluation
    seen = []
    original = evaluation.batch_to_device

    def terminated_in_the_first_batch(batch, device, **kwargs):
        seen.append(1)
        if len(seen) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(batch, device, **kwargs)
    monkeypatch.setattr(evaluation, "batch_to_device", terminated_in_the_first_batch)
    code = train.main(QUICK + ["--out", str(tmp_path), "--max-steps", "4", "--eval-every", "2", "--save-every", "100",
                               "--eval-split", "validation[:40]", "--batch-size", "2"])
    assert code == 143 and len(seen) == 1  # one batch of 20, then the stop
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not any("mean_iou" in r for r in read_log(tmp_path))  # an evaluation cut short counts for nothing


def test_a_json_file_that_is_not_a_file_or_is_nested_without_end_is_named_not_read(tmp_path):
    """Every JSON reader goes through segformer.files.read_json: a FIFO named like an annotation would block
    forever, a symlink to /dev/zero would fill the memory, 100,000 levels gave a raw RecursionError."""
    import os

    from data.labelling import is_labelme
    from segformer.errors import DataError
    from segformer.files import read_json, read_json_object
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "folder.json").mkdir()
    for name, said in (("fifo.json", "a FIFO, not a file"), ("zero.json", "a device or socket, not a file"),
                       ("deep.json", "JSON nested too deeply to read"), ("folder.json", "a folder, not a file")):
        with pytest.raises(DataError, match=f"{name}: {said}"):
            read_json(tmp_path / name, error=DataError)
        assert not is_labelme(tmp_path / name)
    with pytest.raises(DataError, match=r"dataset.json: 1 MB; a JSON file of at most 0 MB"):
        (tmp_path / "dataset.json").write_text(" " * 2**20 + "{}")
        read_json(tmp_path / "dataset.json", error=DataError, limit=1000)
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json_object(tmp_path / "ok.json") == {"a": [1, 2]}


def test_image_annotation_and_list_files_that_are_not_files_are_named_not_read(tmp_path, capsys, monkeypatch):
    """Every file a reader opens goes through segformer.files.read_bytes: a FIFO named like an image hung the
    doctor and train.py's check of the data for ever, an annotation that is a symlink to /dev/zero filled the
    memory, a sparse file claims what it does not hold, and a list file that is not UTF-8 was a raw
    UnicodeDecodeError."""
    from data.__main__ import main as doctor
    from segformer.files import read_bytes, read_text
    folder = write_flat_folder(tmp_path / "data", [np.full((20, 24), 1)] * 5)
    (folder / "images" / "001.png").unlink()
    os.mkfifo(folder / "images" / "001.png")
    (folder / "annotations" / "002.png").unlink()
    (folder / "annotations" / "002.png").symlink_to("/dev/zero")
    samples = open_source(str(folder), "train", train=True, test_size=0)
    dataset = build_dataset(samples, num_labels=2, size=32)
    for stem, said in (("001", r"images/001\.png: a FIFO, not a file; expected an image"),
                       ("002", r"annotations/002\.png: a device or socket, not a file; expected an image")):
        with pytest.raises(DataError, match=said):
            dataset[[i for i, name in enumerate(samples.names()) if stem in name][0]]
    assert doctor([str(folder), "--num-labels", "2"]) == 1
    out = capsys.readouterr().out
    assert "images/001.png: a FIFO, not a file" in out and "annotations/002.png: a device or socket" in out
    with pytest.raises(DataError, match=r"bad sample\(s\) in .*: a (FIFO|device or socket), not a file"):
        train.execute(["--data", str(folder), "--num-labels", "2", "--max-steps", "1", "--size", "32",
                       "--batch-size", "2", "--out", str(tmp_path / "run")])
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as f:
        f.truncate(2**33)  # 8 GiB claimed, none of it on the disk
    with pytest.raises(DataError, match=r"sparse\.png: 8,192 MB; an image file of at most 4,096 MB is read"):
        read_bytes(sparse, error=DataError, expected="an image file")
    (tmp_path / "val.txt").write_bytes(b"images/000.png annotations/000.png\n\xff\xfe")
    with pytest.raises(DataError, match=r"val\.txt: not UTF-8 text \(byte 35 is b'\\xff'\); expected a list"):
        read_text(tmp_path / "val.txt", error=DataError, expected="a list")
    (tmp_path / "bom.txt").write_bytes("\ufeffsea\nboat\n".encode())  # Windows tools' byte-order mark
    assert read_text(tmp_path / "bom.txt", error=DataError).splitlines() == ["sea", "boat"]


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    """train.py --out and --eval-only --report on a file system that refuses writes (/sys: read-only even
    for root): the run lock gave a raw OSError, the report one only after the whole evaluation."""
    import train
    from helpers import TINY, tiny_checkpoint
    assert train.main(list(TINY) + ["--out", "/sys/segformer-run"]) == 2
    err = capsys.readouterr().err
    assert "--out /sys/segformer-run: cannot write there" in err and "Traceback" not in err
    checkpoint = tiny_checkpoint(tmp_path / "model", num_labels=3, seed=0)
    assert train.main(["--eval-only", "--checkpoint", str(checkpoint), "--report", "/sys/segformer-report",
                       "--eval-split", "validation[:2]"]) == 2
    err = capsys.readouterr().err
    assert "--report /sys/segformer-report: cannot write there" in err and len(err.strip().splitlines()) == 1
    import ablate
    import convert  # a raw PermissionError; ablate.py refused at its first training, after printing its plan
    for script, argv in ((convert, [str(checkpoint), "--to", "hf", "--out", "/sys/segformer-hf"]),
                         (convert, [str(checkpoint), "--to", "mmseg", "--out", "/sys/segformer-mm/b0.pth"]),
                         (ablate, ["decoder:mmseg", "--out", "/sys/segformer-ablation"])):
        assert script.main(argv) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith("error: --out /sys/segformer-") and "cannot write there" in out.err
        assert len(out.err.strip().splitlines()) == 1


def test_a_folder_no_run_has_used_keeps_the_users_files_without_overwrite(tmp_path, capsys, monkeypatch):
    """--out W, W holding no checkpoint but a TensorBoard folder of other experiments and the user's own
    metrics.jsonl: a new run deleted them; --out '' did the same to the working directory. Refused, the
    files intact and no lock file left behind (so a second try is refused too)."""
    import train
    from helpers import TINY
    folder = tmp_path / "experiments"
    (folder / "tensorboard" / "other").mkdir(parents=True)
    (folder / "tensorboard" / "other" / "events").write_text("theirs")
    (folder / "metrics.jsonl").write_text('{"theirs": 1}\n')
    for out in (str(folder), ""):
        monkeypatch.chdir(folder)
        for _ in range(2):
            assert train.main(list(TINY) + ["--out", out]) == 2
            err = capsys.readouterr().err
            assert "holds metrics.jsonl, tensorboard, which no run of this project wrote" in err, err
            assert "--overwrite" in err and "Traceback" not in err
        assert (folder / "tensorboard" / "other" / "events").read_text() == "theirs"
        assert (folder / "metrics.jsonl").read_text() == '{"theirs": 1}\n'
        assert not (folder / ".lock").exists()
