"""Helpers shared by the tests: reference models from `transformers` (the test oracle) with random
weights, small images, tiny training runs."""

import contextlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segformer.config import VARIANTS


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and buffer random values, so that a swapped or dropped weight (a zero
    bias, a unit LayerNorm) cannot hide. Norm scales stay near 1 and variances positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.05 * noise)
    return model


def hf_config(variant: str = "b0", num_labels: int = 7, **kwargs):
    from transformers import SegformerConfig
    hidden_sizes, depths, decoder = VARIANTS[variant]
    return SegformerConfig(hidden_sizes=list(hidden_sizes), depths=list(depths), decoder_hidden_size=decoder,
                           num_labels=num_labels, **kwargs)


def hf_segmentation_model(variant: str = "b0", num_labels: int = 7, seed: int = 0, **kwargs):
    from transformers import SegformerForSemanticSegmentation
    torch.manual_seed(seed)
    return randomize_(SegformerForSemanticSegmentation(hf_config(variant, num_labels, **kwargs)), seed).eval()


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 256], -1)
    return Image.fromarray((base + rng.integers(0, 60, (height, width, 3))).clip(0, 255).astype(np.uint8))


def write_flat_folder(root: Path, masks: list[np.ndarray], *, seed: int = 0) -> Path:
    """images/ + annotations/ (a single-split folder): one random image per mask, named 000.png, 001.png, ..."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i, mask in enumerate(masks):
        random_image(*mask.shape, seed=seed + i).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "annotations" / f"{i:03d}.png")
    return root


def write_ade_folder(root: Path, train_masks: list[np.ndarray], val_masks: list[np.ndarray]) -> Path:
    """ADEChallengeData2016's layout: images/{training,validation}/ + annotations/{training,validation}/."""
    for split, masks in (("training", train_masks), ("validation", val_masks)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, mask in enumerate(masks):
            random_image(*mask.shape, seed=i).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(mask.astype(np.uint8)).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


# 20 synthetic training images of 64x64, 2 x 2 images per step: 5 steps per epoch, so 8 steps cross an epoch.
TINY = ["--train-split", "train[:20]", "--eval-split", "validation[:8]", "--size", "64", "--batch-size", "2",
        "--grad-accum", "2", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1",
        "--no-plots"]  # drawing is most of a tiny run's time; tests/test_report.py checks the plots


def run_training(out, *extra, base=TINY):
    import train
    return train.execute(list(base) + ["--out", str(out)] + list(extra))


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def running(app):
    """The app on uvicorn in a thread, at a free loopback port: its base URL; stopped on leaving."""
    import uvicorn

    import serve
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = serve.listening_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    try:
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def tiny_checkpoint(folder: Path, num_labels: int, seed: int) -> Path:
    """A random-weight B0 of `num_labels` classes saved as a checkpoint folder whose input size is 64."""
    from segformer import SegFormer
    from segformer.checkpoint import write_preprocessor_config
    torch.manual_seed(0)
    randomize_(SegFormer.from_variant("b0", num_labels=num_labels), seed=seed).save_pretrained(folder)
    write_preprocessor_config(folder, size=64, reduce_labels=False)
    return folder


def shallow_checkpoint(folder: Path):
    """(model, folder): a random-weight B0 with one block per stage (every kind of module, the least to trace
    and compile), 5 classes, input size 64, with a palette; what the export tests export."""
    from segformer import SegFormer
    from segformer.checkpoint import write_preprocessor_config
    from segformer.files import write_json
    torch.manual_seed(0)
    model = randomize_(SegFormer.from_variant("b0", num_labels=5, depths=(1, 1, 1, 1)), seed=3).eval()
    model.save_pretrained(folder)
    write_preprocessor_config(folder, size=64, reduce_labels=False)
    write_json([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], folder / "palette.json")
    return model, folder


def run_isolated(checks: str, timeout: float = 850) -> None:
    """tests/isolated/<checks>.py run by pytest in a process of its own, passing only if every check there does.
    For the runtimes whose native libraries (OpenVINO and NNCF, ExecuTorch's pybindings, AOTInductor's
    compiled packages) stay loaded in the process: with them loaded, the xdist worker crashed now and then,
    long after, on a later test's subprocess start (SIGSEGV, si_code SI_KERNEL, strace; four of six full runs),
    which failed whatever test that worker ran next, or hung CI. Their output comes back on failure."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-o",
                           "addopts=-ra", "-q", str(root / "tests" / "isolated" / f"{checks}.py")],
                          cwd=root, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"tests/isolated/{checks}.py:\n" + done.stdout[-8000:] + done.stderr[-2000:]
