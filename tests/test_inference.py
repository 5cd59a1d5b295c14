"""The predictor and infer.py: reference agreement, sliding window, TTA, segments, EXIF, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export
import infer
from segformer import SegFormer, SegFormerConfig
from segformer.images import load_image
from segformer.inference import Predictor, ResizedView, combine

from helpers import random_image, randomize_


def test_label_map_equals_the_reference_post_processing(hf_b0_dir):
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor
    reference = SegformerForSemanticSegmentation.from_pretrained(hf_b0_dir).eval()
    processor = SegformerImageProcessor()
    image = random_image(90, 131)
    with torch.no_grad():
        outputs = reference(**processor(images=image, return_tensors="pt"))
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[(90, 131)])[0]
    upsampled = torch.nn.functional.interpolate(outputs.logits, size=(90, 131), mode="bilinear", align_corners=False)[0]
    top2 = upsampled.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-4  # pixels whose argmax no float rounding can flip

    prediction = Predictor(SegFormer.from_pretrained(hf_b0_dir), device="cpu")(image, probabilities=True)
    assert prediction.label_map.shape == (90, 131)
    assert clear.float().mean() > 0.99
    assert torch.equal(prediction.label_map[clear], expected[clear])
    assert torch.allclose(prediction.probabilities, upsampled.softmax(0), atol=1e-5)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomize_(SegFormer.from_variant("b0", num_labels=5), seed=2).eval()


def test_a_window_covering_the_image_equals_whole_image_mode(small_model):
    image = random_image(64, 64)
    whole = Predictor(small_model, size=64, device="cpu")(image, probabilities=True)
    slide = Predictor(small_model, mode="slide", window=64, stride=64, device="cpu")(image, probabilities=True)
    assert torch.allclose(whole.probabilities, slide.probabilities, atol=1e-6)
    assert torch.equal(whole.label_map, slide.label_map)


def test_sliding_window_sizes_overlap_and_padding(small_model):
    for size, window, stride in [((70, 150), 64, 40), ((40, 50), 64, 32)]:  # overlapping; smaller than window
        prediction = Predictor(small_model, mode="slide", window=window, stride=stride, device="cpu")(
            random_image(*size), probabilities=True)
        assert prediction.label_map.shape == size
        assert torch.allclose(prediction.probabilities.sum(0), torch.ones(size), atol=1e-5)


def test_flip_tta_of_a_symmetric_input_on_a_mirror_symmetric_model_equals_no_tta():
    """With mirror-symmetric kernels and no key/value reduction (whose windows are not mirror
    symmetric), the model commutes with a horizontal flip on sizes 4k+1. Flip-TTA must then change
    nothing: on a symmetric input (flipping along the wrong axis would show), and on any input
    (forgetting to flip the prediction back would show, as that prediction is not symmetric)."""
    torch.manual_seed(0)
    model = randomize_(SegFormer(SegFormerConfig(sr_ratios=(1, 1, 1, 1), num_labels=4)), seed=4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    left = np.asarray(random_image(65, 33))
    symmetric = Image.fromarray(np.concatenate([left, left[:, :-1][:, ::-1]], axis=1))  # 65 x 65, mirror image
    plain = Predictor(model, size=65, device="cpu")(symmetric, probabilities=True)
    flipped = Predictor(model, size=65, tta=True, scales=(1.0,), device="cpu")(symmetric, probabilities=True)
    assert torch.allclose(plain.probabilities, flipped.probabilities, atol=1e-5)
    assert torch.equal(plain.label_map, flipped.label_map)
    asymmetric = random_image(65, 65, seed=3)
    plain = Predictor(model, size=65, device="cpu")(asymmetric, probabilities=True).probabilities
    tta = Predictor(model, size=65, tta=True, scales=(1.0,), device="cpu")
    flipped = tta(asymmetric, probabilities=True).probabilities
    assert (plain - plain.flip(-1)).abs().max() > 1e-3
    assert torch.allclose(plain, flipped, atol=1e-5)


def test_multiscale_tta_and_aspect_mode_keep_the_image_size(small_model):
    image = random_image(45, 77)
    for predictor in (Predictor(small_model, size=64, tta=True, device="cpu"),
                      Predictor(small_model, size=64, mode="aspect", device="cpu")):
        assert predictor(image).label_map.shape == (45, 77)


def test_segments_agree_with_the_label_map(small_model):
    prediction = Predictor(small_model, size=64, device="cpu")(random_image(37, 53))
    segments = prediction.segments
    present = prediction.label_map.unique().tolist()
    assert [s["label"] for s in segments] == [f"LABEL_{i}" for i in present]  # ascending ids, default names
    union = np.zeros((37, 53), bool)
    for class_id, segment in zip(present, segments):
        mask = np.asarray(segment["mask"])
        assert segment["score"] is None and segment["mask"].mode == "L" and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, prediction.label_map.numpy() == class_id)
        union |= mask == 255
    assert union.all()


def test_odd_sizes_and_exif_rotation_give_upright_outputs(small_model, tmp_path):
    small_model.save_pretrained(tmp_path / "model")
    image = random_image(41, 67)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    image.save(tmp_path / "odd.png")
    assert load_image(tmp_path / "rotated.jpg").size == (41, 67)  # width, height after the rotation
    code = infer.main(infer.get_args(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "rotated.jpg"),
                                      str(tmp_path / "odd.png"), "--size", "64", "--out", str(tmp_path / "out")]))
    assert code == 0
    assert Image.open(tmp_path / "out" / "rotated_mask.png").size == (41, 67)
    assert Image.open(tmp_path / "out" / "odd_mask.png").size == (67, 41)
    summary = json.loads((tmp_path / "out" / "odd.json").read_text())
    assert sum(s["pixels"] for s in summary["segments"]) == 41 * 67
    assert summary["image"] == str(tmp_path / "odd.png") and summary["size"] == [67, 41]
    overlay = Image.open(tmp_path / "out" / "odd_overlay.png")
    assert overlay.height >= 41 and overlay.width > 67  # the picture and its legend


def test_bad_files_are_reported_skipped_and_fail_the_run(small_model, tmp_path, capsys):
    small_model.save_pretrained(tmp_path / "model")
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    random_image(30, 40).save(folder / "good.png")
    random_image(30, 40).save(folder / "sub" / "nested.jpg")
    (folder / "broken.jpg").write_text("this is not a JPEG")
    args = ["--checkpoint", str(tmp_path / "model"), str(folder), str(tmp_path / "missing.png"),
            "--size", "64", "--out", str(tmp_path / "out")]
    assert infer.main(infer.get_args(args)) == 1
    out = capsys.readouterr()
    assert "broken.jpg: cannot decode image" in out.err
    assert "2 file(s) segmented" in out.out and "2 failed" in out.out and "missing.png" in out.out
    assert (tmp_path / "out" / "good_mask.png").is_file() and (tmp_path / "out" / "sub" / "nested_mask.png").is_file()

    # existing outputs are kept unless --overwrite
    mask = tmp_path / "out" / "good_mask.png"
    os.utime(mask, (0, 0))
    infer.main(infer.get_args(args))
    assert mask.stat().st_mtime == 0 and "2 skipped because their outputs exist" in capsys.readouterr().out
    infer.main(infer.get_args(args + ["--overwrite"]))
    assert mask.stat().st_mtime > 0


def test_masks_past_256_classes_are_16_bit(tmp_path):
    model = SegFormer.from_variant("b0", num_labels=300)
    model.save_pretrained(tmp_path / "model")
    random_image(20, 24).save(tmp_path / "x.png")
    infer.main(infer.get_args(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "x.png"), "--size", "32",
                               "--out", str(tmp_path / "out")]))
    assert Image.open(tmp_path / "out" / "x_mask.png").mode.startswith("I")


def test_a_list_of_images_of_different_sizes_equals_one_by_one(small_model):
    images = [random_image(40, 60, seed=1), random_image(75, 33, seed=2), random_image(64, 64, seed=3)]
    for mode in ("resize", "aspect"):
        predictor = Predictor(small_model, size=64, mode=mode, batch_size=2, device="cpu")
        together = predictor(images, probabilities=True)
        for image, result in zip(images, together):
            alone = predictor(image, probabilities=True)
            assert result.label_map.shape == (image.height, image.width)
            assert torch.allclose(result.probabilities, alone.probabilities, atol=1e-5)


def test_an_unloadable_checkpoint_is_named_without_a_traceback(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_text("not tensors")
    assert infer.main(infer.get_args(["--checkpoint", str(tmp_path), str(tmp_path / "x.png")])) == 2
    assert "model.safetensors: not a valid safetensors file" in capsys.readouterr().err


# ---- bounded memory: a few classes at a time, the same label map ---------------------------------------

def reference_prediction(model, image, *, size=64, tta=False, scales=(0.75, 1.0, 1.25)):
    """The previous implementation's arithmetic, all classes at full size: resize, upsample every
    class, softmax, average over the views, argmax."""
    from segformer.images import to_tensor as to_uint8_tensor
    from segformer.preprocess import normalize, resize_image
    x = to_uint8_tensor(image)
    H, W = x.shape[-2:]
    total = 0
    views = [(s, f) for s in (scales if tta else (1.0,)) for f in ((False, True) if tta else (False,))]
    for scale, flipped in views:
        inputs = normalize(resize_image(x.flip(-1) if flipped else x, (round(size * scale),) * 2))
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(inputs[None]), size=(H, W), mode="bilinear",
                                                     align_corners=False)[0]
        logits = logits.flip(-1) if flipped else logits
        if not tta:
            return logits.argmax(0), logits.softmax(0)
        total = total + logits.softmax(0)
    return (total / len(views)).argmax(0), total / len(views)


@pytest.mark.parametrize("tta", [False, True])
def test_the_label_map_is_the_full_size_computation(small_model, tta):
    image = random_image(77, 103, seed=9)
    expected, probabilities = reference_prediction(small_model, image, tta=tta)
    got = Predictor(small_model, size=64, tta=tta, device="cpu")(image, probabilities=True)
    if not tta:  # one view: exactly the argmax of the upsampled logits
        assert torch.equal(got.label_map, expected)
    else:  # averaged probabilities: float rounding aside, the same (and the same label map)
        top2 = probabilities.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-6
        assert clear.float().mean() > 0.999 and torch.equal(got.label_map[clear], expected[clear])
        assert (got.label_map != expected).sum() == 0
    assert torch.allclose(got.probabilities, probabilities, atol=1e-6)


@pytest.mark.parametrize("mode", ["resize", "aspect", "slide"])
@pytest.mark.parametrize("tta", [False, True])
def test_a_few_classes_at_a_time_give_the_same_bits(small_model, mode, tta, monkeypatch):
    """memory_mb=1: two classes at a time and the slide windows in a temporary file; the label map and
    the probabilities equal those computed all at once, bit for bit."""
    import segformer.inference as inference
    image = random_image(70, 150, seed=4)
    options = dict(size=64, mode=mode, window=64, stride=40, tta=tta, scales=(0.75, 1.0), device="cpu")
    whole = Predictor(small_model, memory_mb=4096, **options)(image, probabilities=True)
    spilled = []
    append = inference.WindowStore.append
    monkeypatch.setattr(inference.WindowStore, "append",
                        lambda self, box, logits: (append(self, box, logits), spilled.append(self.file is not None)))
    chunked = Predictor(small_model, memory_mb=1e-3, **options)(image, probabilities=True)
    assert torch.equal(whole.label_map, chunked.label_map)
    assert torch.equal(whole.probabilities, chunked.probabilities)
    assert mode != "slide" or any(spilled)  # the windows went to disk


def test_memory_stays_bounded_on_a_large_photo(tmp_path):
    """2000x1500 with 150 classes: the full-size logits alone would take 1.8 GB."""
    import subprocess
    import sys
    code = """
import sys, torch
sys.path.insert(0, %r)
def peak_mb():  # since exec: ru_maxrss would include pytest's own peak, from before exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
from segformer import SegFormer
from segformer.inference import Predictor, ResizedView, combine
torch.manual_seed(0)
model = SegFormer.from_variant("b0", num_labels=150)
image = torch.randint(0, 256, (3, 1500, 2000), dtype=torch.uint8)
Predictor(model, size=256, device="cpu", memory_mb=64)(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8))
before = peak_mb()
label_map = Predictor(model, size=256, device="cpu", memory_mb=64)(image).label_map
print(label_map.shape[0], label_map.shape[1], int(peak_mb() - before))
""" % str(Path(__file__).resolve().parents[1])
    H, W, grown_mb = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert (H, W) == (1500, 2000) and grown_mb < 400


# ---- confidence: the top probability, its margin and the entropy, a few classes at a time ------------------

@pytest.mark.parametrize("mode, tta", [("resize", False), ("slide", True)])
def test_confidence_maps_equal_those_of_the_full_probabilities(small_model, mode, tta):
    image = random_image(70, 150, seed=4)
    options = dict(size=64, mode=mode, window=64, stride=40, tta=tta, scales=(0.75, 1.0), device="cpu")
    whole = Predictor(small_model, memory_mb=4096, **options)(image, probabilities=True)
    chunked = Predictor(small_model, memory_mb=1e-3, **options)(image, confidence=True)  # two classes at a time
    p = whole.probabilities
    top2 = p.topk(2, dim=0).values
    assert torch.equal(chunked.label_map, whole.label_map)
    assert torch.allclose(chunked.confidence["max"], top2[0], atol=1e-6)
    assert torch.allclose(chunked.confidence["margin"], top2[0] - top2[1], atol=1e-6)
    assert torch.allclose(chunked.confidence["entropy"], -(p * p.clamp(min=1e-12).log()).sum(0), atol=1e-5)
    labels = chunked.label_map.numpy()
    for segment in chunked.segments:  # the pipeline's score: here, the segment's mean top probability
        inside = labels == [k for k, v in small_model.id2label.items() if v == segment["label"]][0]
        assert segment["score"] == pytest.approx(float(top2[0].numpy()[inside].mean()), abs=1e-5)
    assert Predictor(small_model, size=64, device="cpu")(image).segments[0]["score"] is None


def test_a_temperature_divides_the_logits_and_keeps_the_label_map(small_model):
    image = random_image(64, 80, seed=1)
    plain = Predictor(small_model, size=64, device="cpu")(image, probabilities=True)
    cooled = Predictor(small_model, size=64, device="cpu", temperature=2.0)(image, probabilities=True)
    assert torch.equal(plain.label_map, cooled.label_map)
    logits = plain.probabilities.clamp(min=1e-30).log()  # log-softmax: the logits up to a constant per pixel
    assert torch.allclose(cooled.probabilities, (logits / 2).softmax(0), atol=1e-5)


def test_infer_writes_the_confidence_map_and_segment_scores(small_model, tmp_path):
    small_model.save_pretrained(tmp_path / "model")
    random_image(48, 64, seed=3).save(tmp_path / "photo.png")
    args = ["--checkpoint", str(tmp_path / "model"), str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"),
            "--size", "64", "--confidence"]
    assert infer.main(infer.get_args(args)) == 0
    top = np.asarray(Image.open(tmp_path / "out" / "photo_confidence.png"))
    assert top.shape == (48, 64) and top.min() >= 255 // 5  # the top of 5 probabilities is at least 1/5
    margin = np.asarray(Image.open(tmp_path / "out" / "photo_margin.png"))
    entropy = np.asarray(Image.open(tmp_path / "out" / "photo_entropy.png"))
    assert (margin <= top).all() and entropy.shape == (48, 64) and entropy.max() <= 255
    segments = json.loads((tmp_path / "out" / "photo.json").read_text())["segments"]
    assert all(0.2 <= s["score"] <= 1 for s in segments)


def test_the_installed_package_alone_does_what_infer_does(tmp_path):
    """What pyproject installs (its `packages`: neither data/ nor training/) loads a checkpoint for inference
    and predicts: in a fresh interpreter whose path holds those packages alone, load_for_inference and the
    Predictor give infer.py's mask, at the size the checkpoint records, with its classes."""
    import shutil
    import subprocess
    import sys
    import tomllib
    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    for package in tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]:
        folder = package.replace(".", "/")
        (site / folder).mkdir(parents=True)
        for file in (root / folder).glob("*.py"):
            shutil.copy(file, site / folder / file.name)
    torch.manual_seed(0)
    model = randomize_(SegFormer.from_variant("b0", num_labels=3, id2label={0: "sky", 1: "road", 2: "car"}), seed=1)
    model.save_pretrained(tmp_path / "trained")
    export.export_checkpoint(str(tmp_path / "trained"), tmp_path / "model", runtime="eager", size=64)
    random_image(50, 70, seed=4).save(tmp_path / "photo.png")
    assert infer.main(infer.get_args(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "photo.png"),
                                      "--out", str(tmp_path / "infer")])) == 0
    script = (
        "import importlib.util, sys, numpy, segformer\n"
        "assert importlib.util.find_spec('data') is None and importlib.util.find_spec('training') is None\n"
        "assert segformer.__file__.startswith(sys.argv[1]), segformer.__file__\n"
        "model, facts = segformer.load_for_inference('model')\n"
        "assert facts.size == 64 and facts.class_names == ('sky', 'road', 'car'), facts\n"
        "prediction = segformer.Predictor(model, **facts.predictor_options)(segformer.load_image('photo.png'))\n"
        "numpy.save('library.npy', prediction.label_map.numpy())\n")
    done = subprocess.run([sys.executable, "-P", "-c", script, str(site)], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "library.npy"),
                          np.asarray(Image.open(tmp_path / "infer" / "photo_mask.png")))


def test_the_confidence_leaves_the_label_map_the_logits_own_argmax():
    """Two logits a last bit apart near 0 round to one probability in exp(x - L); the label map under
    confidence=True (the service's scores) must still be the logits' argmax, as without it (class 1 here;
    the softmax's tie went to class 0 before)."""
    low = torch.tensor(0.01)
    logits = torch.stack([low, torch.nextafter(low, torch.tensor(1.0)), torch.tensor(-3.0)])
    logits = logits.view(3, 1, 1).expand(3, 4, 4).contiguous()
    plain, _, _ = combine([ResizedView(logits.clone(), (4, 4), False)], 3, (4, 4), memory=1 << 20,
                          probabilities=False)
    sure, _, confidence = combine([ResizedView(logits.clone(), (4, 4), False)], 3, (4, 4), memory=1 << 20,
                                  probabilities=False, confidence=True)
    assert plain.unique().tolist() == [1]
    assert torch.equal(sure, plain)
    assert confidence["margin"].max() < 1e-6  # the probabilities are tied: the margin says so


def test_logits_that_are_not_finite_make_no_mask_and_say_so(tmp_path, capsys):
    """Weights that are finite but too large for float32 (here the first patch embedding x 1e37), or a band
    image of values far beyond its statistics, made NaN logits, whose argmax is class 0 everywhere: infer.py
    wrote a mask of one class and exited 0. Now the Predictor refuses (NonFiniteLogits), infer.py names the
    file and writes nothing for it, and the service refuses such a model at load, in one line."""
    from safetensors.torch import load_file, save_file

    from helpers import tiny_checkpoint
    from segformer.bands import Bands
    from segformer.errors import CheckpointError
    from segformer.inference import NonFiniteLogits
    from serving.segmenter import Segmenter
    folder = tiny_checkpoint(tmp_path / "huge", num_labels=3, seed=0)
    weights = load_file(folder / "model.safetensors")
    weights["segformer.encoder.patch_embeddings.0.proj.weight"] *= 1e37
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    random_image(40, 48).save(tmp_path / "photo.png")
    model = SegFormer.from_pretrained(folder).eval()  # every weight finite: it loads
    with pytest.raises(NonFiniteLogits, match=r"logits are NaN or infinite at [\d,]+ of [\d,]+ values, so no mask"):
        Predictor(model, size=64, device="cpu")(load_image(tmp_path / "photo.png"))
    assert infer.main(infer.get_args(["--checkpoint", str(folder), str(tmp_path / "photo.png"),
                                      "--out", str(tmp_path / "masks")])) == 1
    out = capsys.readouterr()
    assert "photo.png: the model's logits are NaN or infinite" in out.out and "Traceback" not in out.err
    assert not list((tmp_path / "masks").glob("photo*"))
    with pytest.raises(CheckpointError, match=r"huge: the model's logits are NaN or infinite on a plain gradient "
                                              r"image: its weights are finite but too large"):
        Segmenter.load(str(folder), device="cpu")
    bands = SegFormer.from_variant("b0", num_labels=3, in_channels=2, depths=(1, 1, 1, 1)).eval()
    predictor = Predictor(bands, size=64, bands=Bands(2, (0.0, 0.0), (1.0, 1.0)), device="cpu")
    raster = np.ones((40, 40, 2), np.float32)
    assert predictor(raster).label_map.shape == (40, 40)
    raster[:20] = 3e38  # finite, and far beyond a std of 1
    with pytest.raises(NonFiniteLogits, match=r"an input far outside the values the model was trained on"):
        predictor(raster)
