"""pretrain.py: the encoder pre-trained as an image classifier, offline, resumed exactly, saved in the hub's
encoder-only layout that transformers and SegFormer.from_pretrained load; its data sources and recipe."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pretrain
from data.classification import ClassificationDataset, open_images
from data.synthetic import CLASSES as SCENE_CLASSES
from helpers import random_image, read_log
from segformer import SegFormer

ROOT = Path(__file__).resolve().parent.parent
# 24 crops of 32x32, 4 x 2 per step: 3 steps per epoch, so 6 steps cross an epoch.
QUICK = ["--train-split", "train[:24]", "--eval-split", "validation[:8]", "--size", "32", "--batch-size", "4",
         "--grad-accum", "2", "--warmup-steps", "2", "--log-every", "1", "--no-plots"]


def run(out, *extra):
    return pretrain.execute(QUICK + ["--out", str(out)] + list(extra))


def write_image_folder(root: Path, splits=("train", "val"), classes=("cat", "dog", "fish"), per_class=3) -> Path:
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                random_image(24 + 4 * c, 40, seed=10 * c + i).save(root / split / name / f"{i}.png")
    return root


def test_pretraining_writes_the_encoder_layout_that_transformers_and_segformer_load(tmp_path, caplog):
    from transformers import SegformerForImageClassification
    from segformer.classification import ImageClassifier
    result = run(tmp_path, "--max-steps", "2", "--eval-every", "2", "--save-every", "2")
    assert result["step"] == 2 and 0 <= result["top1"] <= result["top5"] <= 1
    evaluations = [r for r in read_log(tmp_path) if "top1" in r]
    assert len(evaluations) == 1 and {"top5", "eval_loss"} <= evaluations[0].keys()
    best = tmp_path / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["architectures"] == ["SegformerForImageClassification"]
    assert list(config["id2label"].values()) == list(SCENE_CLASSES)
    assert json.loads((best / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}

    ours = ImageClassifier.from_pretrained(best).eval()
    reference = SegformerForImageClassification.from_pretrained(best).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(pixel_values=images).logits, atol=1e-4, rtol=0)

    with caplog.at_level("INFO", logger="segformer"):
        segmenter = SegFormer.from_pretrained(best, num_labels=5)
    said = [r.getMessage() for r in caplog.records if "encoder only" in r.getMessage()]
    weights = load_file(best / "model.safetensors")
    encoder = {k: v for k, v in weights.items() if k.startswith("segformer.encoder.")}
    assert len(said) == 1 and f"its {len(encoder)} encoder tensors are loaded" in said[0]
    mine = segmenter.state_dict()
    carried = {k: v for k, v in mine.items() if k.startswith("encoder.")}
    assert len(carried) == len(encoder)  # every encoder tensor, and nothing else of the encoder
    reloaded = SegFormer.from_pretrained(best, num_labels=5).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in carried.items())  # the same every time: not random
    assert not all(torch.equal(reloaded[k], mine[k]) for k in mine if k.startswith("decoder."))  # the head is new


def interrupt_after_step(monkeypatch, count):
    original, calls = pretrain.train_step, [0]

    def stepped(run_, micro_batches):
        result = original(run_, micro_batches)
        calls[0] += 1
        if calls[0] == count:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the loop saves after the step and stops
        return result
    monkeypatch.setattr(pretrain, "train_step", stepped)


def test_interrupt_then_resume_equals_a_straight_run(tmp_path, monkeypatch, capsys):
    steps = ["--max-steps", "6", "--eval-every", "3", "--save-every", "100", "--clip-grad", "1.0", "--seed", "3",
             "--mixup", "0.8", "--cutmix", "1.0", "--random-erasing", "0.25"]  # DeiT's batch recipe, drawn again
    run(tmp_path / "straight", *steps)
    interrupt_after_step(monkeypatch, 4)  # inside the 2nd epoch
    assert pretrain.main(QUICK + ["--out", str(tmp_path / "split"), *steps]) == 130
    assert "interrupted: saved" in capsys.readouterr().out
    monkeypatch.undo()
    pretrain.execute(["--resume", str(tmp_path / "split" / "checkpoint-4")])  # nothing but the checkpoint
    straight = load_file(tmp_path / "straight" / "checkpoint-6" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "checkpoint-6" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    state = torch.load(tmp_path / "split" / "checkpoint-6" / "training_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batches_done"]) == (6, 1, 6)
    evaluations = lambda out: [(r["step"], r["top1"]) for r in read_log(out) if "top1" in r]  # noqa: E731
    assert evaluations(tmp_path / "split") == evaluations(tmp_path / "straight")  # one log, no step twice


def test_the_batch_recipe_mixes_smooths_and_repeats_per_batch():
    config = pretrain.PretrainConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1, random_erasing=1.0)
    augment = pretrain.BatchAugment(config, num_classes=7)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 7
    mixed, targets = augment(images, labels, epoch=0, batch=3)
    assert targets.shape == (8, 7) and torch.allclose(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.1 / 7 - 1e-6 and targets.max() < 1  # smoothed, and mixed with another image
    assert not torch.equal(mixed, images)
    again, again_targets = augment(images, labels, epoch=0, batch=3)
    assert torch.equal(again, mixed) and torch.equal(again_targets, targets)  # a resumed run draws the same
    other, _ = augment(images, labels, epoch=1, batch=3)
    assert not torch.equal(other, mixed)
    plain = pretrain.BatchAugment(pretrain.PretrainConfig(mixup=0, cutmix=0, label_smoothing=0, random_erasing=0), 7)
    same, one_hot = plain(images, labels, epoch=0, batch=0)
    assert torch.equal(same, images) and torch.equal(one_hot, torch.nn.functional.one_hot(labels, 7).float())


def test_the_schedule_warms_up_then_follows_half_a_cosine_and_no_decay_on_vectors():
    factor = pretrain.cosine_schedule(warmup_steps=4, total_steps=14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.5) and factor(14) == pytest.approx(0.0)
    model = pretrain.build_model(pretrain.DEFAULT, ["a", "b"], resumed=None, trust_code=False)
    decay, no_decay = pretrain.get_optimizer(pretrain.DEFAULT, model).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert model.encoder.stages[3].blocks[1].drop_path.p == pytest.approx(0.1)  # DeiT's


def test_an_image_folder_gives_classes_labels_and_a_disjoint_holdout(tmp_path):
    root = write_image_folder(tmp_path / "folder")
    train = open_images(str(root), "train", train=True)
    val = open_images(str(root), "validation", train=False)
    assert train.class_names == val.class_names == ["cat", "dog", "fish"] and len(train) == len(val) == 9
    assert [train[i][1] for i in range(len(train))] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(f"{root}/train/" in name for name in train.names())
    assert all(f"{root}/val/" in name for name in val.names())
    sample = ClassificationDataset(val, train=False, size=16)[4]
    assert sample["pixel_values"].shape == (3, 16, 16) and sample["pixel_values"].dtype == torch.uint8
    assert sample["labels"] == 1

    one = write_image_folder(tmp_path / "one", splits=(".",), per_class=5)  # the classes at the root: one split
    train, val = open_images(str(one), "train", train=True), open_images(str(one), "validation", train=False)
    assert (len(train), len(val)) == (12, 3) and not set(train.names()) & set(val.names())


def test_a_saved_dataset_pretrains_then_fine_tunes_a_modified_encoder(tmp_path, capsys, caplog):
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature
    rows = {"img": [random_image(32, 32, seed=i) for i in range(12)], "kind": [i % 2 for i in range(12)]}
    features = Features({"img": ImageFeature(), "kind": ClassLabel(names=["plain", "striped"])})
    dataset = Dataset.from_dict(rows, features=features)
    DatasetDict({"train": dataset.select(range(8)), "test": dataset.select(range(8, 12))}).save_to_disk(
        str(tmp_path / "saved"))
    pretrain.execute(["--data", str(tmp_path / "saved"), "--eval-split", "test", "--image-column", "img",
                      "--label-column", "kind", "--size", "32", "--batch-size", "4", "--max-steps", "1",
                      "--eval-every", "1", "--no-plots", "--attention", "linear", "--out", str(tmp_path / "pt")])
    out = capsys.readouterr().out
    assert "8 train / 4 eval images, 2 classes" in out and "attention linear" in out
    config = json.loads((tmp_path / "pt" / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "plain", "1": "striped"} and config["segformer_parts"] == {"attention": "linear"}

    import train
    train.execute(["--pretrained", str(tmp_path / "pt" / "best"), "--train-split", "train[:4]", "--eval-split",
                   "validation[:2]", "--size", "32", "--batch-size", "2", "--max-steps", "1", "--eval-every", "1",
                   "--no-plots", "--out", str(tmp_path / "seg")])
    out = capsys.readouterr().out
    assert "encoder only" in caplog.text
    assert "training b0 with attention linear" in out  # the variant, from the checkpoint
    assert json.loads((tmp_path / "seg" / "best" / "config.json").read_text())["segformer_parts"] == \
        {"attention": "linear"}


@pytest.mark.parametrize("argv, message", [
    (["--data", "no/such/folder"], r"no/such/folder: no such file or directory"),
    (["--data", "{empty}"], r"no split 'train'|no class folders"),
    (["--eval-split", "train[:8]"], r"8 validation images of synthetic are also training images"),
    (["--batch-size", "64", "--train-split", "train[:8]"], r"the training split has 8 images: too few for one step"),
    (["--recipe", "cifar"], r"--recipe"),
    (["--mixup", "-1"], r"mixup"),
])
def test_bad_inputs_are_one_line_naming_what_is_wrong(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    try:
        code = pretrain.main(argv + ["--out", str(tmp_path / "run"), "--max-steps", "1", "--no-plots"])
    except SystemExit as exit_:  # argparse's own refusal, with the usage line
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_help_names_the_recipe_and_every_setting(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    text = capsys.readouterr().out
    for name in pretrain.PretrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text or "--no-" + name.replace("_", "-") in text, name
    assert "DeiT" in text and "--resume" in text


def test_torchrun_two_processes_on_cpu(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "pretrain.py"), *QUICK, "--max-steps", "2", "--eval-every", "2", "--save-every", "2",
               "--device", "cpu", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "of 16 images on 2 x cpu" in done.stdout
    state = torch.load(tmp_path / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    assert len([r for r in read_log(tmp_path) if "top1" in r]) == 1  # only rank 0 logs


def test_synthetic_crops_show_their_class():
    crops = open_images("synthetic", "validation[:14]", train=False)
    assert crops.class_names == list(SCENE_CLASSES) and len(crops) == 14
    for i in range(14):
        image, label, name = crops[i]
        assert label == i % 7 and image.size == (64, 64) and name.endswith(f"{i:05d}")
    first = np.asarray(crops[0][0])
    assert np.array_equal(first, np.asarray(open_images("synthetic", "validation", train=False)[0][0]))
    assert not np.array_equal(first, np.asarray(open_images("synthetic", "train", train=True)[0][0]))
    assert isinstance(crops[0][0], Image.Image)
