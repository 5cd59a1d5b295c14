"""serve.py: the Inference API's contract, infer.py's label maps, dynamic batching, every bad request, shutdown.

The servers listen on 127.0.0.1 at a free port, are sent a bounded number of requests, and are stopped here."""

import asyncio
import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import infer
import serve
from segformer.cli import run_main
from segformer.images import load_image
from segformer.runtimes import load_for_inference
from serving.batcher import Batcher
from serving.http import build_app
from serving.protocol import Limits, decode_mask, png
from serving.segmenter import Segmenter

from helpers import random_image, tiny_checkpoint, running

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "model"
    return tiny_checkpoint(folder, num_labels=5, seed=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two photos of other sizes than the model's input, one a JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    random_image(90, 120, seed=1).save(folder / "wide.png")
    random_image(100, 70, seed=3).save(folder / "tall.jpg", quality=90)
    return sorted(folder.iterdir())


LIMITS = Limits(max_bytes=300_000, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def service(checkpoint):
    segmenter = Segmenter.load(str(checkpoint), device="cpu", batch_size=4)
    with running(build_app(segmenter, Batcher(segmenter.predict, max_batch=4, max_wait=0.005), LIMITS)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def test_health_and_metadata(service):
    assert service.get("/health").json() == {"status": "ok"}
    meta = service.get("/metadata").json()
    assert meta["id2label"] == {str(i): f"LABEL_{i}" for i in range(5)}
    assert (meta["input_size"], meta["runtime"], meta["device"]) == (64, "eager", "cpu")
    assert meta["batching"]["max_batch"] == 4 and meta["limits"]["max_body_bytes"] == 300_000


@pytest.mark.parametrize("mode", ["resize", "aspect", "slide"])
def test_the_label_maps_are_infer_pys(service, checkpoint, images, tmp_path, mode):
    """Pixel for pixel, as the PNG of class ids (Accept: image/png) and as the segments' masks."""
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), *map(str, images), "--out", str(tmp_path),
                                      "--mode", mode])) == 0
    for path in images:
        expected = np.asarray(Image.open(tmp_path / f"{path.stem}_mask.png"))
        answer = service.post(f"/predict?mode={mode}", content=path.read_bytes(), headers={"Accept": "image/png"})
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(answer.content))), expected)

        segments = service.post(f"/predict?mode={mode}", content=path.read_bytes()).json()
        record = json.loads((tmp_path / f"{path.stem}.json").read_text())
        assert [s["label"] for s in segments] == [s["label"] for s in record["segments"]]
        painted = np.full(expected.shape, -1)
        for s in segments:
            assert isinstance(s["score"], float) and 0 < s["score"] <= 1
            mask = decode_mask(s["mask"])
            assert (painted[mask] == -1).all()  # the masks do not overlap
            painted[mask] = int(s["label"].split("_")[1])
        assert np.array_equal(painted, expected)  # and cover the image with infer.py's classes


def test_a_multipart_form_and_the_overlay(service, images):
    path = images[0]
    form = service.post("/predict", files={"image": (path.name, path.read_bytes(), "image/png")},
                        headers={"Accept": "image/png"})
    raw = service.post("/predict", content=path.read_bytes(), headers={"Accept": "image/png"})
    assert form.status_code == 200 and form.content == raw.content
    overlay = service.post("/predict?output=overlay&alpha=0.8", content=path.read_bytes())
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(overlay.content)).convert("RGB"))
    original = np.asarray(Image.open(path).convert("RGB"))
    assert drawn.shape[0] == original.shape[0] and drawn.shape[1] > original.shape[1]  # and a legend
    assert (drawn[:, :original.shape[1]] != original).any(axis=2).mean() > 0.9


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels: a decompression bomb's first bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def chunked(data: bytes):
    """A body sent without Content-Length (Transfer-Encoding: chunked), that cannot be refused by its header."""
    for start in range(0, len(data), 65536):
        yield data[start:start + 65536]


BAD_REQUESTS = {  # name: (request options, status, words the error must hold)
    "empty body": (dict(content=b""), 400, "no image"),
    "not an image": (dict(content=b"GIF89a but not really" * 10), 400, "not an image"),
    "truncated image": (dict(content=png(random_image(60, 60))[:400]), 400, "cannot decode"),
    "decompression bomb (header)": (dict(content=png_claiming(9000, 9000)), 413, "9000 x 9000"),
    "decompression bomb past PIL's limit": (dict(content=png_claiming(30000, 30000)), 413, "900000000 pixels"),
    "decompression bomb (real)": (dict(content=png(Image.new("L", (1200, 1000)))), 413, "1200 x 1000"),
    "over the size limit": (dict(content=os.urandom(400_000)), 413, "at most 300000"),
    "over the size limit, chunked": (dict(content=chunked(os.urandom(400_000))), 413, "at most 300000"),
    "wrong content type": (dict(content=b"{}", headers={"Content-Type": "application/json"}), 415, "Content-Type"),
    "unknown query option": (dict(content=b"x", params={"colour": "red"}), 400, "'colour'"),
    "unknown mode": (dict(content=b"x", params={"mode": "tiles"}), 400, "mode='tiles'"),
    "alpha out of range": (dict(content=b"x", params={"alpha": "2"}), 400, "0..1"),
    "an option twice": (dict(content=b"x", params=[("mode", "slide"), ("mode", "resize")]), 400, "twice"),
    "unacceptable Accept": (dict(content=b"x", headers={"Accept": "text/html"}), 406, "Accept"),
    "form without image": (dict(files={"picture": ("a.png", b"x", "image/png")}), 400, "'image'"),
    "malformed form": (dict(content=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data"}),
                       400, "form"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_is_a_4xx_with_one_line(service, name):
    options, status, words = BAD_REQUESTS[name]
    answer = service.post("/predict", **options)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert words in error and "\n" not in error
    assert service.get("/health").status_code == 200  # and the service goes on


def test_unknown_routes_and_methods_are_json_errors(service):
    for method, path, status in (("GET", "/nothing", 404), ("GET", "/predict", 405), ("POST", "/health", 405)):
        answer = service.request(method, path)
        assert answer.status_code == status and "POST /predict" in answer.json()["error"]


class Recording(torch.nn.Module):
    """A model that records its batch sizes, and runs out of memory on any batch holding a uniform image."""

    def __init__(self, model):
        super().__init__()
        self.model, self.id2label, self.batches = model, model.id2label, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if (x.flatten(2).std(2) == 0).all(1).any():  # an image of one colour
            raise torch.OutOfMemoryError("CPU out of memory (simulated)")
        return self.model(x)


def test_concurrent_requests_run_as_one_batch_and_a_failing_one_fails_alone(checkpoint, images):
    model, facts = load_for_inference(str(checkpoint))
    recording = Recording(model)
    segmenter = Segmenter(recording, facts, device="cpu", batch_size=8)
    alone = {path.name: segmenter.predict("resize", [load_image(path)])[0].label_map.numpy()
             for path in images}
    bodies = [path.read_bytes() for path in images] * 3 + [png(Image.new("RGB", (50, 40), (9, 9, 9)))]
    names = [path.name for path in images] * 3 + ["uniform"]

    async def send_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/predict", content=b, headers={"Accept": "image/png"})
                                          for b in bodies))

    batcher = Batcher(segmenter.predict, max_batch=8, max_wait=1.0)  # long enough for all 7 to gather
    with running(build_app(segmenter, batcher, LIMITS)) as url:
        recording.batches.clear()
        answers = asyncio.run(send_all(url))
        stats = httpx.get(f"{url}/metadata").json()["batching"]
    assert recording.batches[0] == 7  # one forward pass for all of them, of three sizes: it failed (the uniform one)
    assert sorted(recording.batches[1:]) == [1] * 7  # then one at a time
    for name, answer in zip(names, answers):
        if name == "uniform":
            assert answer.status_code == 503 and "out of memory" in answer.json()["error"]
        else:
            assert answer.status_code == 200
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(answer.content))), alone[name])
    assert stats["requests"] == 7 and stats["in_flight"] == 0


class NaNOnUniform(torch.nn.Module):
    """A model whose logits are NaN for an image of one colour."""

    def __init__(self, model):
        super().__init__()
        self.model, self.id2label = model, model.id2label

    def forward(self, x):
        logits = self.model(x)
        uniform = (x.flatten(2).std(2) == 0).all(1)
        return torch.where(uniform[:, None, None, None], torch.nan, logits)


def test_an_image_the_model_makes_nan_of_is_a_422_and_the_others_are_answered(checkpoint, images):
    """NaN logits made a mask of class 0 (the argmax of NaN) answered with 200; now that image alone is refused,
    saying so, and a batch it was in is answered one at a time."""
    model, facts = load_for_inference(str(checkpoint))
    segmenter = Segmenter(NaNOnUniform(model), facts, device="cpu", batch_size=8)
    with running(build_app(segmenter, Batcher(segmenter.predict, max_batch=8, max_wait=0.005), LIMITS)) as url:
        uniform = httpx.post(f"{url}/predict", content=png(Image.new("RGB", (50, 40), (9, 9, 9))), timeout=60)
        photo = httpx.post(f"{url}/predict", content=images[0].read_bytes(), timeout=60)
    assert uniform.status_code == 422
    assert uniform.json()["error"].startswith("this image: the model's logits are NaN or infinite at")
    assert photo.status_code == 200 and photo.json()


def test_batched_answers_agree_with_one_at_a_time(checkpoint, images):
    """One forward pass of several images: each image's label map as when it runs alone (a batched
    convolution rounds differently in the last bits, so a pixel whose two best classes are within 1e-5
    may go either way: none here)."""
    model, facts = load_for_inference(str(checkpoint))
    segmenter = Segmenter(model, facts, device="cpu", batch_size=8)
    photos = [load_image(path) for path in images] * 2
    together = segmenter.predict("resize", photos)
    for photo, prediction in zip(photos, together):
        assert torch.equal(prediction.label_map, segmenter.predict("resize", [photo])[0].label_map)


def test_serve_py_answers_the_request_in_flight_on_sigterm(checkpoint, images):
    """The command line: the port it prints, a request that waits in a batch, SIGTERM: it is answered, and
    the server exits by the signal, cleanly."""
    command = [sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint), "--port", "0",
               "--max-wait-ms", "1500"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "on http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.strip().rsplit(" ", 1)[-1]
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.05)
        result = {}
        sender = threading.Thread(target=lambda: result.update(
            answer=httpx.post(f"{url}/predict", content=images[0].read_bytes(), timeout=60)))
        sender.start()
        for _ in range(600):  # until the request waits in the batcher
            if httpx.get(f"{url}/metadata").json()["batching"]["in_flight"] == 1:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        sender.join(60)
        assert result["answer"].status_code == 200 and result["answer"].json()[0]["label"].startswith("LABEL_")
        assert process.wait(60) == -signal.SIGTERM  # uvicorn stops as the signal asks, after the requests
    finally:
        process.kill()
        _, errors = process.communicate()
    assert "Traceback" not in errors and "Finished server process" in errors


def test_serve_py_without_a_model_is_one_line(tmp_path, capsys):
    assert run_main(lambda: serve.serve(serve.get_args(["--checkpoint", str(tmp_path / "missing")]))) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "missing" in error and len(error.splitlines()) == 1
