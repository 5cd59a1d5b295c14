"""Video: frames per second reached, and what temporal smoothing does to label flicker and to accuracy.

    python benchmarks/bench_video.py                         # runs/synthetic/best, decays 0, 0.3, 0.6, 0.8
    python benchmarks/bench_video.py --checkpoint DIR --decays 0 0.5 --frames 120

Two test clips are made from fresh synthetic scenes (the split the demo model never trained on), whose true
label maps are known, and written as H.264 MP4 files (what the model then reads has been through the codec):

    still   the camera does not move; each frame has new sensor noise (Gaussian, sigma 8 of 255): every
            label that changes between frames is flicker
    pan     the scene slides one pixel a frame to the right, with the same noise: labels at moving edges
            change for real, and smoothing makes them lag

Each clip is segmented as infer.py segments a video (segformer.video: Frames, TemporalSmoothing,
label_flicker), once per decay. The table: the mean fraction of pixels whose label changed from the previous
frame (flicker), the pixel accuracy against the true label maps, and frames per second (decoding included).
"""

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segformer.cli import bounded  # noqa: E402
from segformer.inference import Predictor  # noqa: E402
from segformer.runtimes import load_for_inference  # noqa: E402
from segformer.video import Frames, TemporalSmoothing, VideoWriter, label_flicker  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/synthetic/best", help="a model trained on the synthetic scenes")
    p.add_argument("--decays", type=bounded(float, 0.0, 0.99), nargs="+", default=[0.0, 0.3, 0.6, 0.8],
                   help="--smooth values to compare (0: off)")
    p.add_argument("--frames", type=bounded(int, 2, 10_000), default=60, help="frames a clip")
    p.add_argument("--size", type=bounded(int, 64, 2048), default=256, help="the clips' frame side")
    p.add_argument("--noise", type=bounded(float, 0.0, 64.0), default=8.0, help="sensor noise sigma, of 255")
    p.add_argument("--threads", type=bounded(int, 1, 1024), help="CPU threads")
    return p.parse_args(argv)


def make_clip(path: Path, *, motion: int, frames: int, size: int, noise: float, seed: int = 0):
    """A clip of a synthetic scene moving `motion` pixels a frame, with noise; its true label maps."""
    from data.synthetic import SyntheticScenes
    from PIL import Image
    image, mask, _ = SyntheticScenes("test", length=1)[0]
    wide = size + motion * frames  # room to pan across
    picture = np.asarray(image.resize((wide, size), Image.BILINEAR))
    labels = np.asarray(mask.resize((wide, size), Image.NEAREST)).astype(np.int64) - 1  # ADE's reduction: 0 ignored
    rng = np.random.default_rng(seed)
    writer, truths = VideoWriter(path, Fraction(25)), []
    for t in range(frames):
        window = slice(motion * t, motion * t + size)
        frame = picture[:, window].astype(np.float32) + rng.normal(0, noise, (size, size, 3))
        writer.write(frame.round().clip(0, 255).astype(np.uint8))
        truths.append(labels[:, window])
    writer.close()
    return truths


def run(path: Path, truths, model, facts, decay: float) -> dict:
    smoothed = TemporalSmoothing(model, decay) if decay else model
    predictor = Predictor(smoothed, **facts.predictor_options, device="cpu")
    previous, flicker, correct, counted = None, [], 0, 0
    start = time.perf_counter()
    with Frames(path) as frames:
        for frame, truth in zip(frames, truths):
            label_map = predictor(frame).label_map
            change = label_flicker(previous, label_map)
            if change is not None:
                flicker.append(change)
            previous = label_map
            known = truth >= 0
            correct += int((label_map.numpy()[known] == truth[known]).sum())
            counted += int(known.sum())
    seconds = time.perf_counter() - start
    return {"flicker": float(np.mean(flicker)), "accuracy": correct / counted, "fps": len(truths) / seconds}


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, facts = load_for_inference(args.checkpoint)
    lines = ["| clip | --smooth | label flicker (% of pixels a frame) | pixel accuracy | frames/s |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, motion in (("still", 0), ("pan", 1)):
            path = Path(tmp) / f"{name}.mp4"
            truths = make_clip(path, motion=motion, frames=args.frames, size=args.size, noise=args.noise)
            for decay in args.decays:
                result = run(path, truths, model, facts, decay)
                lines.append(f"| {name} | {decay:g} | {100 * result['flicker']:.3f} | {result['accuracy']:.4f} | "
                             f"{result['fps']:.1f} |")
                print(lines[-1], flush=True)
    print(f"\n{args.frames} frames of {args.size} x {args.size}, noise sigma {args.noise:g}, {args.checkpoint}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args()))
