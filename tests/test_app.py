"""app.py, the Gradio demo, driven in a real headless browser (Debian's chromium through Playwright): upload an
image, wait for the result, check what the page shows. The page must not reach beyond 127.0.0.1."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

import app
from segformer.images import load_image
from serving.segmenter import Segmenter

from helpers import random_image, tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("app") / "model", num_labels=6, seed=5)
    segmenter = Segmenter.load(str(folder))
    blocks = app.Demo(segmenter).blocks(app.sample_images(None, count=2))
    port = app.free_port("127.0.0.1")
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, theme=app.theme(),
                  ssr_mode=False, footer_links=[], quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", segmenter
    finally:
        blocks.close()


def test_the_demo_in_a_browser_shows_the_overlay_legend_areas_and_confidence(demo, tmp_path):
    from playwright.sync_api import sync_playwright
    url, segmenter = demo
    photo = tmp_path / "photo.png"
    random_image(96, 128, seed=7).save(photo)
    prediction = segmenter.predict("resize", [load_image(photo)])[0]
    present = [segmenter.names[int(c)] for c in np.unique(prediction.label_map.numpy())]

    outside = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
            page.goto(url)
            page.locator("#input input[type=file]").set_input_files(str(photo))
            page.locator("#legend-list .legend-name").first.wait_for(timeout=60_000)
            shown = page.locator("#legend-list .legend-name").all_inner_texts()
            overlay_src = page.locator("#overlay img").first.get_attribute("src")
            overlay = Image.open(io.BytesIO(page.request.get(overlay_src).body())).convert("RGB")
            confidence_src = page.locator("#confidence img").first.get_attribute("src")
            confidence = Image.open(io.BytesIO(page.request.get(confidence_src).body()))
            table = page.locator("#areas").inner_text()
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()

    assert sorted(shown) == sorted(present)  # the legend names the classes present, and only those
    original = np.asarray(Image.open(photo).convert("RGB"))
    drawn = np.asarray(overlay)[:, :original.shape[1]]
    assert drawn.shape == original.shape and (drawn != original).any(axis=2).mean() > 0.9  # coloured in
    assert confidence.size == (128, 96) and np.asarray(confidence).min() > 0  # a probability map, never 0
    assert all(name in table for name in present)
    assert not outside, f"the page reached beyond the demo: {outside[:3]}"


def test_the_demo_function_matches_the_service(demo):
    """Mode and opacity reach the model and the drawing: the overlay at opacity 0 is the photo itself."""
    _, segmenter = demo
    image = random_image(80, 100, seed=9)
    picture, _, table, _ = app.Demo(segmenter).segment(image, "slide", 0.0)
    assert np.array_equal(np.asarray(picture)[:, :100], np.asarray(image))
    label_map = segmenter.predict("slide", [image])[0].label_map.numpy()
    assert sum(row[1] for row in table) == label_map.size
    assert {row[0] for row in table} == {segmenter.names[int(c)] for c in np.unique(label_map)}


def test_an_image_the_model_makes_nan_of_is_said_on_the_page(demo):
    """NaN logits made a one-class overlay shown as an answer; the page now says why there is none."""
    import gradio as gr
    import torch

    from segformer.runtimes import load_for_inference
    _, segmenter = demo
    model, facts = load_for_inference(segmenter.facts.source)

    class NaNs(torch.nn.Module):
        id2label = model.id2label

        def forward(self, x):
            return model(x) * float("nan")
    with pytest.raises(gr.Error, match=r"this image: the model's logits are NaN or infinite"):
        app.Demo(Segmenter(NaNs(), facts, device="cpu")).segment(random_image(40, 48), "resize", 0.5)
