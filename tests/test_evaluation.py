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


def test_calibrate_fits_a_temperature_that_the_checkpoint_keeps(checkpoint, tmp_path, capsys):
    """--calibrate: the temperature of lowest NLL, saved beside the checkpoint (calibration.json), which its
    facts then carry (the Predictor divides by it: tests/test_inference.py; export.py puts it in the graph:
    tests/test_bands.py) and a later report measures as fitted."""
    import shutil
    from segformer import load_for_inference
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    metrics, content = report(model_dir, tmp_path / "report", "--calibrate")
    before, after = metrics["calibration"]["before"], metrics["calibration"]["after"]
    saved = json.loads((model_dir / "calibration.json").read_text())
    assert saved["temperature"] == pytest.approx(after["temperature"]) and after["nll"] <= before["nll"]
    assert content["calibration"]["after"]["ece"] == pytest.approx(after["ece"], abs=1e-6)
    assert (tmp_path / "report" / "reliability.png").is_file()
    assert "temperature" in capsys.readouterr().out
    _, facts = load_for_inference(model_dir)
    assert facts.temperature == pytest.approx(saved["temperature"])
    assert facts.predictor_options["temperature"] == facts.temperature
    _, again = report(model_dir, tmp_path / "again")  # no fit: the saved temperature measured, as fitted
    for key in ("temperature", "ece", "nll", "brier"):
        assert again["calibration"]["after"][key] == pytest.approx(content["calibration"]["after"][key], abs=1e-9)
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
                       "--corruptions", "frost"]) == 2
    assert "--corruptions frost: unknown corruption 'frost'" in capsys.readouterr().err
    import importlib.util
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:  # a machine without OpenCV: spatter is refused before evaluating
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
        assert train.main(["--eval-only", "--checkpoint", str(checkpoint), "--report", str(tmp_path / "x"),
                           "--corruptions", "all"]) == 2
    assert "--corruptions all: spatter needs OpenCV" in capsys.readouterr().err


def test_motion_streaks_glass_shuffle_and_clipped_zoom_follow_imagenet_c_step_by_step():
    """The corruptions' three hand-written steps against ImageNet-C's own (imagecorruptions' NumPy code,
    transcribed here step by step: np.roll with the edge repeated, the loop of tuple swaps, scipy's zoom)."""
    import math

    import numpy as np
    import scipy.ndimage
    import torch
    from data.corruptions import _clipped_zoom, _jostle, _streak

    def shift(image, dx, dy):  # (H, W, C) rolled, the rows and columns that came round replaced by the edge
        out = np.roll(image, (dy, dx), axis=(0, 1))
        if dx > 0:
            out[:, :dx] = out[:, dx:dx + 1]
        elif dx < 0:
            out[:, dx:] = out[:, dx - 1:dx]
        if dy > 0:
            out[:dy] = out[dy:dy + 1]
        elif dy < 0:
            out[dy:] = out[dy - 1:dy]
        return out

    def motion_blur(image, radius, sigma, angle):
        width = 2 * radius + 1
        kernel = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
        kernel /= kernel.sum()
        point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
        hypot = math.hypot(*point)
        blurred = np.zeros_like(image)
        for i in range(width):
            dy, dx = -math.ceil(i * point[0] / hypot - 0.5), -math.ceil(i * point[1] / hypot - 0.5)
            if abs(dy) >= image.shape[0] or abs(dx) >= image.shape[1]:
                break
            blurred += kernel[i] * shift(image, dx, dy)
        return blurred

    x = np.random.default_rng(0).random((23, 31, 3))
    for radius, sigma, angle in ((10, 3, 30.0), (15, 12, -45.0), (12, 8, -100.0), (20, 15, 7.5)):
        got = _streak(torch.from_numpy(x).permute(2, 0, 1).float(), radius, sigma, angle).permute(1, 2, 0).numpy()
        assert np.abs(got - motion_blur(x, radius, sigma, angle)).max() < 1e-5, (radius, sigma, angle)

    image = torch.randint(0, 256, (3, 12, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for d, iterations in ((1, 2), (2, 3), (4, 2)):
        got = _jostle(image, d, iterations, torch.Generator().manual_seed(5))
        g, expected = torch.Generator().manual_seed(5), image.permute(1, 2, 0).numpy().copy()
        rows, cols = range(12 - d, d, -1), range(17 - d, d, -1)
        for _ in range(iterations):
            offsets = iter(torch.randint(-d, d, (len(rows) * len(cols), 2), generator=g).tolist())
            for h in rows:
                for w in cols:
                    dx, dy = next(offsets)
                    expected[h, w], expected[h + dy, w + dx] = expected[h + dy, w + dx], expected[h, w]  # its line
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), (d, iterations)
        assert not np.array_equal(expected, image.permute(1, 2, 0).numpy())

    for zoom in (1.06, 1.3, 2.5, 4.5):
        H, W = x.shape[:2]
        h, w = math.ceil(H / zoom), math.ceil(W / zoom)
        top, left = (H - h) // 2, (W - w) // 2
        expected = scipy.ndimage.zoom(x[top:top + h, left:left + w], (zoom, zoom, 1), order=1)[:H, :W]
        got = _clipped_zoom(torch.from_numpy(x).permute(2, 0, 1), zoom).permute(1, 2, 0).numpy()
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-9, zoom


def test_spatter_is_imagenet_c_spatter_drop_for_drop():
    """Spatter against ImageNet-C's code transcribed (scikit-image's gaussian, OpenCV's steps), from the same
    Gaussian layer: water drops (severity 2) and mud (severity 5)."""
    import cv2
    import numpy as np
    import scipy.ndimage
    import skimage.filters
    import torch
    from data.corruptions import Corruption, _smooth
    from helpers import random_image

    layer = np.random.default_rng(3).normal(0.6, 0.3, (37, 53))
    for sigma in (1, 2.5, 4):
        expected = scipy.ndimage.gaussian_filter(layer, sigma, mode="nearest")
        assert np.abs(_smooth(torch.from_numpy(layer), sigma).numpy() - expected).max() < 1e-12

    image = np.array(random_image(64, 96, seed=4))
    for severity, (loc, scale, sigma, threshold, intensity, mud) in ((2, (0.65, 0.3, 3, 0.68, 0.6, 0)),
                                                                     (5, (0.67, 0.4, 1, 0.65, 1.5, 1))):
        corruption = Corruption("spatter", severity)
        got = corruption(torch.from_numpy(image).permute(2, 0, 1).contiguous(), 7).permute(1, 2, 0).numpy()
        g = torch.Generator().manual_seed(corruption.seed * 1_000_003 + 7)  # the layer it drew
        liquid = torch.randn(64, 96, generator=g, dtype=torch.float64).numpy() * scale + loc
        x = image / 255.0  # from here on, ImageNet-C's lines
        liquid = skimage.filters.gaussian(liquid, sigma=sigma)
        liquid[liquid < threshold] = 0
        if not mud:
            liquid = (liquid * 255).astype(np.uint8)
            dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
            dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
            dist = cv2.blur(dist, (3, 3)).astype(np.float32)
            m = liquid * dist
            m = m / m.max() * intensity
            expected = np.clip(x + m[..., None] * np.array([175, 238, 238]) / 255, 0, 1) * 255
        else:
            m = skimage.filters.gaussian(np.where(liquid > threshold, 1, 0).astype(np.float32), sigma=intensity)
            m[m < 0.8] = 0
            expected = np.clip(x * (1 - m[..., None]) + np.array([63, 42, 20]) / 255 * m[..., None], 0, 1) * 255
        assert np.abs(got.astype(float) - expected).max() <= 0.5 + 1e-6, severity  # ours rounded to uint8
        assert np.abs(got.astype(float) - image).mean() > 1, severity


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "5e-324", "0", "-2", "1e300"])
def test_a_temperature_that_would_wreck_every_mask_is_refused_by_name(tmp_path, value):
    """calibration.json is read before any logits are divided by it: an infinite temperature made every pixel
    class 0, a denormal one every probability NaN, and JSON got -Infinity written back."""
    from segformer.calibration import read_temperature
    from segformer.errors import CheckpointError
    (tmp_path / "calibration.json").write_text(f'{{"temperature": {value}}}')
    with pytest.raises(CheckpointError, match=r"calibration\.json: the temperature must be a number in 0\.01\.\.100"):
        read_temperature(tmp_path)
    (tmp_path / "calibration.json").write_text('{"temperature": 1.7}')
    assert read_temperature(tmp_path) == 1.7
