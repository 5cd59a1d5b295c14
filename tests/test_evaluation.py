"""The evaluation report (train.py --eval-only --report): what it writes, each image's own numbers, the
worst images, and the same report from two processes as from one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import train
from helpers import run_training

ROOT = Path(__file__).resolve().parent.parent
EVAL = ["--eval-split", "validation[:6]", "--batch-size", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_training(out, "--max-steps", "3", "--eval-every", "100", "--save-every", "3")
    return out / "checkpoint-3"


def report(checkpoint, out, *extra):
    metrics = train.execute(["--eval-only", "--checkpoint", str(checkpoint), *EVAL, "--report", str(out), *extra])
    return metrics, json.loads((out / "report.json").read_text())


def test_the_report_holds_every_metric_per_class_and_per_image(checkpoint, tmp_path, capsys):
    metrics, content = report(checkpoint, tmp_path / "report")
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {
        "report.json", "per_class.csv", "per_image.csv", "worst.png", "README.md", "confusion.csv"}
    plain = train.execute(["--eval-only", "--checkpoint", str(checkpoint), *EVAL])
    assert content["metrics"]["mean_iou"] == pytest.approx(plain["mean_iou"], abs=1e-6)  # one code path
    assert set(content["metrics"]) == {"mean_iou", "mean_accuracy", "overall_accuracy", "frequency_weighted_iou",
                                       "mean_precision", "mean_recall", "mean_f1", "mean_boundary_iou"}
    rows = content["per_image"]
    assert [r["image"] for r in rows] == [f"synthetic-validation-{i:05d}" for i in range(6)]
    own = [r["mean_iou"] for r in rows]
    assert content["per_image_mean_iou"] == pytest.approx(sum(own) / len(own), abs=1e-5)
    for i in (1, 4):  # an image's own numbers are the data set's numbers of that image alone
        alone = train.execute(["--eval-only", "--checkpoint", str(checkpoint),
                               "--eval-split", f"validation[{i}:{i + 1}]"])
        assert rows[i]["mean_iou"] == pytest.approx(alone["mean_iou"], abs=1e-5)
        assert rows[i]["accuracy"] == pytest.approx(alone["overall_accuracy"], abs=1e-5)
    by_score = sorted(rows, key=lambda r: r["mean_iou"])
    assert content["worst_images"] == [r["image"] for r in by_score]  # all six (k = 8), the worst first
    lines = (tmp_path / "report" / "per_image.csv").read_text().splitlines()
    assert len(lines) == 7 and lines[0].startswith("image,labelled_pixels,accuracy,mean_iou,iou sky")
    card = (tmp_path / "report" / "README.md").read_text()
    assert "| class | IoU | accuracy | precision | recall | F1 | Boundary IoU |" in card
    assert "mean of the images' own mean IoU" in capsys.readouterr().out


def test_the_report_is_the_checkpoints_model_card_with_its_results(checkpoint, tmp_path):
    from huggingface_hub import ModelCard
    own = (checkpoint / "README.md").read_text()
    _, content = report(checkpoint, tmp_path / "report")
    card = ModelCard((tmp_path / "report" / "README.md").read_text())
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    split = content["split"]
    for key in ("mean_iou", "mean_f1", "mean_boundary_iou", "frequency_weighted_iou"):  # the hub shows these
        assert found[(split, key)] == round(content["metrics"][key], 4), key
    text = card.text
    assert text.index("## Evaluation") < text.index("## Training settings") and "## How to use" in text
    assert (checkpoint / "README.md").read_text() == own  # the checkpoint itself is not touched

    copy = tmp_path / "published"  # the card copied beside the weights, evaluated again: one section, one entry
    __import__("shutil").copytree(checkpoint, copy)
    published = ModelCard((tmp_path / "report" / "README.md").read_text())
    other = __import__("copy").copy(published.data.eval_results[0])
    other.dataset_split, other.metric_value = "test", 0.5  # another split's result: kept
    published.data.eval_results.append(other)
    published.save(copy / "README.md")
    report(copy, tmp_path / "again")
    card = ModelCard((tmp_path / "again" / "README.md").read_text())
    assert card.text.count("## Evaluation") == 1
    entries = [(r.dataset_split, r.metric_type) for r in card.data.eval_results]
    assert len(entries) == len(set(entries)) == len(found) + 1 and ("test", other.metric_type) in entries


def test_two_processes_write_the_report_one_process_writes(checkpoint, tmp_path):
    _, single = report(checkpoint, tmp_path / "one")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), "--eval-only", "--checkpoint", str(checkpoint), *EVAL, "--device", "cpu",
               "--report", str(tmp_path / "two")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "report.json").read_text())
    assert double["per_image"] == single["per_image"] and double["worst_images"] == single["worst_images"]
    for key, value in single["metrics"].items():
        assert double["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert double["per_class"] == single["per_class"]


def test_report_needs_eval_only(tmp_path, capsys):
    assert train.main(["--report", str(tmp_path)]) == 2
    assert "--report goes with --eval-only" in capsys.readouterr().err


def test_calibrate_fits_a_temperature_that_infer_and_export_apply(checkpoint, tmp_path, capsys):
    import shutil
    import export
    from segformer import SegFormer
    from segformer.checkpoint import describe
    from segformer.onnx import OnnxModel
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    metrics, content = report(model_dir, tmp_path / "report", "--calibrate")
    before, after = metrics["calibration"]["before"], metrics["calibration"]["after"]
    saved = json.loads((model_dir / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(after["temperature"]) and after["nll"] <= before["nll"]
    assert content["calibration"]["after"]["ece"] == pytest.approx(after["ece"], abs=1e-6)
    assert (tmp_path / "report" / "reliability.png").is_file()
    assert "temperature" in capsys.readouterr().out
    assert describe(model_dir).temperature == pytest.approx(saved["temperature"])
    export.export_checkpoint(str(model_dir), tmp_path / "onnx")
    x = __import__("torch").randn(1, 3, 64, 64)
    eager = SegFormer.from_pretrained(model_dir).eval()
    with __import__("torch").no_grad():
        expected = eager(x) / saved["temperature"]
    got = OnnxModel(tmp_path / "onnx" / "model.onnx")(x)
    assert (got - expected).abs().max().item() < 1e-4  # the graph's logits are the calibrated ones
    weights = str(model_dir / "model.safetensors")
    assert train.main(["--eval-only", "--checkpoint", weights, *EVAL, "--calibrate"]) == 2
    assert "--calibrate saves calibration.json beside the checkpoint" in capsys.readouterr().err


def test_corruptions_are_deterministic_and_grow_with_severity():
    import torch
    from data.corruptions import ALL, Corruption
    from helpers import random_image
    image = torch.from_numpy(__import__("numpy").array(random_image(64, 96, seed=2))).permute(2, 0, 1).contiguous()
    for name in ALL:
        outputs = [Corruption(name, s)(image, 7) for s in (1, 5)]
        assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outputs), name
        assert torch.equal(outputs[0], Corruption(name, 1)(image, 7)), name  # seeded: the same every time
        change = [(o.float() - image.float()).abs().mean().item() for o in outputs]
        assert 0 < change[0] < change[1], (name, change)
    noisy = [Corruption("gaussian_noise", 3)(image, i) for i in (0, 1)]
    assert not torch.equal(*noisy)  # each sample its own noise


def test_robustness_table_and_heat_map_in_the_report(checkpoint, tmp_path, capsys):
    metrics, content = report(checkpoint, tmp_path / "report", "--corruptions", "contrast,gaussian_noise")
    r = content["robustness"]
    assert list(r["miou"]) == ["contrast", "gaussian_noise"] and all(len(v) == 5 for v in r["miou"].values())
    values = [v for row in r["miou"].values() for v in row]
    assert r["mean_corruption_miou"] == pytest.approx(sum(values) / 10)
    assert r["relative_robustness"] == pytest.approx(r["mean_corruption_miou"] / metrics["mean_iou"])
    assert (tmp_path / "report" / "robustness.png").is_file()
    assert "relative robustness" in capsys.readouterr().out
    assert train.main(["--eval-only", "--checkpoint", str(checkpoint), "--report", str(tmp_path / "x"),
                       "--corruptions", "snow"]) == 2
    assert "--corruptions snow: unknown corruption 'snow'" in capsys.readouterr().err
