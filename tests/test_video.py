"""Video: infer.py on a video file (an overlay video at its frame rate, each frame's mask), temporal smoothing."""

import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from segformer import SegFormer
from segformer.inference import Predictor
from segformer.video import Frames, TemporalSmoothing, VideoWriter, label_flicker

from helpers import random_image, randomize_, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video") / "model"
    return tiny_checkpoint(folder, num_labels=4, seed=3)


def noisy_clip(path, frames=8, rate=Fraction(12)):
    """One picture with new noise in every frame, at 12 frames a second; 66 x 50 (odd sides)."""
    base = np.asarray(random_image(50, 66, seed=4)).astype(np.float32)
    rng = np.random.default_rng(0)
    writer = VideoWriter(path, rate)
    for _ in range(frames):
        writer.write((base + rng.normal(0, 12, base.shape)).round().clip(0, 255).astype(np.uint8))
    writer.close()


def test_a_video_in_an_overlay_video_out_at_its_frame_rate(checkpoint, tmp_path):
    noisy_clip(tmp_path / "clip.mp4")
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(tmp_path / "clip.mp4"), "--out",
                                      str(tmp_path / "out"), "--video-masks"])) == 0
    with Frames(tmp_path / "out" / "clip_overlay.mp4") as frames:
        assert frames.rate == 12 and frames.count == 8
        overlay = [np.asarray(frame) for frame in frames]
    with Frames(tmp_path / "clip.mp4") as frames:
        inputs = [frame for frame in frames]
    assert len(overlay) == 8 and overlay[0].shape == (50, 66, 3)  # the odd width is cropped by a pixel
    masks = sorted((tmp_path / "out" / "clip_masks").iterdir())
    assert [m.name for m in masks] == [f"{i:06d}.png" for i in range(8)]
    predictor = Predictor(SegFormer.from_pretrained(checkpoint), size=64)
    for frame, mask in zip(inputs, masks):  # each frame's mask is the image predictor's
        assert np.array_equal(np.asarray(Image.open(mask)), predictor(frame).label_map.numpy())
    summary = json.loads((tmp_path / "out" / "clip_video.json").read_text())
    assert summary["frames"] == 8 and summary["frame_rate"] == 12 and summary["smooth"] == 0
    changes = [label_flicker(torch.from_numpy(np.array(Image.open(a))).long(),
                             torch.from_numpy(np.array(Image.open(b))).long()) for a, b in zip(masks, masks[1:])]
    assert summary["label_flicker"] == pytest.approx(np.mean(changes), abs=1e-6)


def test_smoothing_averages_the_probabilities_over_frames():
    """Frame 2's logits are log(d p1 + (1 - d) p2); decay 0 is the frame alone; a new size starts again."""
    torch.manual_seed(0)
    model = randomize_(SegFormer.from_variant("b0", num_labels=3), seed=1).eval()
    first, second = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        p1, p2 = model(first).softmax(1), model(second).softmax(1)
        smoothed = TemporalSmoothing(model, 0.7)
        smoothed(first)
        assert torch.allclose(smoothed(second).exp(), 0.7 * p1 + 0.3 * p2, atol=1e-6)
        assert torch.allclose(smoothed(torch.randn(1, 3, 96, 64)).exp().sum(1), torch.ones(1, 24, 16), atol=1e-5)
        assert smoothed.average.shape[-2:] == (24, 16)  # started again at the new size
        plain = TemporalSmoothing(model, 0.0)
        plain(first)
        assert torch.equal(plain(second).softmax(1).argmax(1), p2.argmax(1))


def test_smoothing_reduces_flicker_on_a_noisy_still_clip(checkpoint, tmp_path):
    noisy_clip(tmp_path / "clip.mp4", frames=12)
    flicker = {}
    for decay in ("0", "0.8"):
        out = tmp_path / f"smooth{decay}"
        assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(tmp_path / "clip.mp4"), "--out",
                                          str(out), "--smooth", decay])) == 0
        flicker[decay] = json.loads((out / "clip_video.json").read_text())["label_flicker"]
    assert flicker["0"] > 0.01 and flicker["0.8"] < flicker["0"] / 2


def test_a_file_that_is_not_a_video_is_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(tmp_path / "broken.mp4"), "--out",
                                      str(tmp_path / "out")])) == 1
    assert "broken.mp4: cannot read it as a video" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.mp4")  # FFmpeg waited on it for ever
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(tmp_path / "pipe.mp4"), "--out",
                                      str(tmp_path / "out")])) == 1
    assert "pipe.mp4: a FIFO, not a file; expected a video file" in capsys.readouterr().err


def test_smoothing_refuses_the_slide_mode(checkpoint, capsys):
    with pytest.raises(SystemExit):
        infer.get_args(["--checkpoint", str(checkpoint), "x.mp4", "--smooth", "0.5", "--mode", "slide"])
    assert "--smooth" in capsys.readouterr().err
