"""Ray: the Ray Serve deployment answers as serve.py does, byte for byte; Ray Data writes infer.py's masks.

A local Ray instance, started here on 2 CPUs with no dashboard, its HTTP proxy on 127.0.0.1, is stopped at the
end of the module."""

import numpy as np
import pytest
from PIL import Image

import infer
from app import free_port
from serving.batcher import Batcher
from serving.http import build_app
from serving.protocol import Limits
from serving.ray_serving import batch_inference, deployment, runtime_env
from serving.segmenter import Segmenter

from helpers import random_image, tiny_checkpoint, running

LIMITS = Limits(max_bytes=500_000, max_pixels=2_000_000)


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


@pytest.fixture(scope="module")
def local_ray():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env(None), log_to_driver=False,
             object_store_memory=200 * 2**20)
    try:
        yield ray
    finally:
        from ray import serve
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_answers_as_serve_py(local_ray, checkpoint, photos):
    import httpx
    from ray import serve
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(str(checkpoint), max_batch=4, limits=LIMITS, segmenter_options={"device": "cpu"}),
              route_prefix="/")
    segmenter = Segmenter.load(str(checkpoint), device="cpu")
    requests = [("/predict", {}, "a.png"), ("/predict?mode=slide", {"Accept": "image/png"}, "sub/b.jpg"),
                ("/predict?output=overlay&alpha=0.3", {}, "a.png"), ("/predict?mode=tiles", {}, "a.png"),
                ("/predict", {}, None)]
    with running(build_app(segmenter, Batcher(segmenter.predict, max_batch=4), LIMITS)) as url:
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
    serve.shutdown()  # its replica's CPU back, for Ray Data


def test_ray_data_writes_infer_pys_masks(local_ray, checkpoint, photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    try:
        rows = batch_inference(str(checkpoint), str(tmp_path / "ray"), images=str(photos), batch_size=2,
                               segmenter_options={"device": "cpu"})
    finally:
        (photos / "broken.png").unlink()
    by_name = {row["path"].rsplit("/", 1)[-1]: row for row in rows}
    assert sorted(by_name) == ["a.png", "b.jpg", "broken.png"]
    assert "broken.png: cannot decode image" in by_name["broken.png"]["error"]
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(photos), "--out",
                                      str(tmp_path / "infer")])) == 0
    for relative in ("a_mask.png", "sub/b_mask.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "ray" / relative)),
                              np.asarray(Image.open(tmp_path / "infer" / relative)))
