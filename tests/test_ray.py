"""Ray: `python -m serving.ray_serving serve` answers as serve.py does, byte for byte; `... batch` writes
infer.py's masks.

Each runs as its own process, as a user runs it: a new local Ray on 2 CPUs with no dashboard and a small object
store, Ray Serve's HTTP proxy on 127.0.0.1. The test stops it (SIGTERM, then the process group killed), so no
Ray process outlives its test, and a Ray that dies takes its command with it, not the test process."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import infer
from app import free_port
from serving.batcher import Batcher
from serving.http import build_app
from serving.protocol import Limits
from serving.segmenter import Segmenter

from helpers import random_image, tiny_checkpoint, running

ROOT = Path(__file__).resolve().parents[1]


def ray_command(*args) -> list[str]:
    return [sys.executable, "-m", "serving.ray_serving", "--object-store-mb", "200", *args]


def first_line(process, timeout: float) -> str:
    """The first line the process prints, or '' if it prints none within `timeout` seconds."""
    line = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else ""


def stop(process):
    """SIGTERM (the command shuts Ray down), then whatever is left of its process group killed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # Ray's own processes, had any outlived the command
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray") / "model"
    return tiny_checkpoint(folder, num_labels=5, seed=6)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    random_image(70, 90, seed=1).save(folder / "a.png")
    (folder / "sub").mkdir()
    random_image(64, 48, seed=2).save(folder / "sub" / "b.jpg", quality=90)
    return folder


def test_ray_serve_answers_as_serve_py(checkpoint, photos, tmp_path):
    port = free_port("127.0.0.1")
    log = tmp_path / "ray_serve.log"  # Ray's chatter, in a file: a pipe nobody reads would fill and block it
    with log.open("w") as errors:
        process = subprocess.Popen(ray_command("serve", "--checkpoint", str(checkpoint), "--port", str(port),
                                               "--max-batch", "4"),
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True)
    try:
        line = first_line(process, timeout=240)  # printed once the replica is up
        if f"on http://127.0.0.1:{port}" not in line:
            stop(process)
            pytest.fail(f"no 'Ray Serve: ... on http://127.0.0.1:{port}' line, got {line!r}:\n"
                        + log.read_text()[-3000:])
        segmenter = Segmenter.load(str(checkpoint), device="cpu")
        requests = [("/predict", {}, "a.png"), ("/predict?mode=slide", {"Accept": "image/png"}, "sub/b.jpg"),
                    ("/predict?output=overlay&alpha=0.3", {}, "a.png"), ("/predict?mode=tiles", {}, "a.png"),
                    ("/predict", {}, None)]
        with running(build_app(segmenter, Batcher(segmenter.predict, max_batch=4), Limits())) as url:
            for path, headers, name in requests:
                body = (photos / name).read_bytes() if name else b""
                ours = httpx.post(url + path, content=body, headers=headers, timeout=60)
                theirs = httpx.post(f"http://127.0.0.1:{port}{path}", content=body, headers=headers, timeout=120)
                assert (theirs.status_code, theirs.headers["content-type"]) == (ours.status_code,
                                                                                ours.headers["content-type"])
                assert theirs.content == ours.content, path
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        meta = httpx.get(f"http://127.0.0.1:{port}/metadata").json()
        assert meta["id2label"]["4"] == "LABEL_4" and meta["batching"]["server"] == "Ray Serve"
        process.terminate()
        assert process.wait(120) == 0  # SIGTERM: the deployment and the local Ray shut down, exit 0
    finally:
        stop(process)


def test_ray_data_writes_infer_pys_masks(checkpoint, photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    try:
        done = subprocess.run(ray_command("batch", "--checkpoint", str(checkpoint), "--images", str(photos),
                                          "--out", str(tmp_path / "ray"), "--max-batch", "2"),
                              cwd=ROOT, capture_output=True, text=True, timeout=400, start_new_session=True)
    finally:
        (photos / "broken.png").unlink()
    assert done.returncode == 1, done.stderr[-3000:]  # one image failed, said by name
    assert "2 image(s) segmented into" in done.stdout and "; 1 failed:" in done.stdout, done.stdout
    assert "broken.png: cannot decode image" in done.stdout
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(photos), "--out",
                                      str(tmp_path / "infer")])) == 0
    for relative in ("a_mask.png", "sub/b_mask.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "ray" / relative)),
                              np.asarray(Image.open(tmp_path / "infer" / relative)))
