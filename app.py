"""A web demo of a SegFormer in Gradio: upload a photo or pick a sample, see the overlay with its legend, each
class's area and the model's confidence; choose the inference mode and the overlay's opacity.

    python app.py                                             # runs/synthetic/best, on http://127.0.0.1:7860
    python app.py --checkpoint nvidia/segformer-b0-finetuned-ade-512-512 --examples ../shared/data/ade20k-samples
    python app.py --checkpoint exported/model.onnx --port 0   # any runtime load_for_inference runs

The samples are fresh synthetic scenes (the demo model's kind of image), and the photos of --examples. The
page uses no internet: Gradio's analytics are off and the theme uses the system's fonts, not a CDN's. It
segments as serve.py and infer.py do (serving/segmenter.py): the label maps are theirs.
"""

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads it then

import numpy as np
from PIL import Image

from segformer.cli import SIZE_RANGE, bounded, run_main
from segformer.errors import ConfigError
from segformer.images import is_image_file, to_rgb
from segformer.inference import NonFiniteLogits

DEFAULT_CHECKPOINT = "runs/synthetic/best"
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the system's own: no request to a font CDN
MONO = ["ui-monospace", "monospace"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="checkpoint directory, weights file, hub id or exported model (default: what train.py wrote)")
    p.add_argument("--examples", help="a folder of photos offered as samples, besides the synthetic scenes")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=7860, help="port (0: any free one)")
    p.add_argument("--size", type=bounded(int, *SIZE_RANGE), help="model input size (default: the checkpoint's)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--threads", type=bounded(int, 1, 1024), help="CPU threads")
    p.add_argument("--trust-code", action="store_true",
                   help="import the code from outside this project that the checkpoint names as a part of its model")
    return p.parse_args(argv)


def sample_images(folder: str | None, count: int = 3) -> list[str]:
    """Paths of the samples: fresh synthetic scenes written to a temporary folder, then --examples' photos."""
    from data.synthetic import SyntheticScenes
    scenes = SyntheticScenes("test", length=count)
    out = Path(tempfile.mkdtemp(prefix="segformer-demo-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # the demo serves them while it runs, no longer
    paths = []
    for i in range(count):
        image, _, name = scenes[i]
        image.save(out / f"{name}.png")
        paths.append(str(out / f"{name}.png"))
    if folder:
        if not Path(folder).is_dir():
            raise ConfigError(f"--examples {folder}: not a folder")
        paths += [str(p) for p in sorted(Path(folder).rglob("*")) if is_image_file(p)][:12]
    return paths


def legend_html(names: dict, colours, areas: list[dict]) -> str:
    """A swatch and the name of each class present, largest first."""
    import html
    rows = "".join(
        f'<li class="legend-row"><span style="display:inline-block;width:1em;height:1em;margin-right:.5em;'
        f'vertical-align:middle;background:rgb{tuple(colours[a["id"]])}"></span>'
        f'<span class="legend-name">{html.escape(a["class"])}</span> {100 * a["fraction"]:.1f}%</li>'
        for a in areas)
    return f'<ul id="legend-list" style="list-style:none;padding:0">{rows}</ul>'


class Demo:
    """The model and what the page shows of one image."""

    def __init__(self, segmenter):
        self.segmenter = segmenter

    def segment(self, image, mode: str, alpha: float):
        """(overlay with its legend, legend HTML, per-class areas, confidence map) of an uploaded image."""
        import gradio as gr
        from segformer.visual import overlay
        if image is None:
            raise gr.Error("upload an image, or pick a sample")
        image = to_rgb(image)
        try:
            prediction = self.segmenter.predict(mode, [image])[0]
        except NonFiniteLogits as e:  # no mask made of NaN: said on the page, as the service answers 422
            raise gr.Error(f"this image: {e}") from None
        names, colours = self.segmenter.names, self.segmenter.colours
        label_map = prediction.label_map.numpy()
        classes, counts = np.unique(label_map, return_counts=True)
        top = prediction.confidence["max"].numpy()
        areas = sorted(({"id": int(c), "class": names[int(c)], "pixels": int(n), "fraction": n / label_map.size,
                         "score": float(top[label_map == c].mean())} for c, n in zip(classes, counts)),
                       key=lambda a: -a["pixels"])
        table = [[a["class"], a["pixels"], round(100 * a["fraction"], 2), round(a["score"], 3)] for a in areas]
        confidence = Image.fromarray((top.clip(0, 1) * 255).round().astype(np.uint8))
        return (overlay(image, label_map, colours, names, alpha), legend_html(names, colours, areas), table,
                confidence)

    def blocks(self, samples: list[str]):
        import gradio as gr
        meta = self.segmenter.metadata()
        with gr.Blocks(title="SegFormer", analytics_enabled=False) as blocks:
            gr.Markdown(f"## SegFormer\n{meta['source']} ({meta['runtime_name']} on {meta['device']}): "
                        f"{len(meta['id2label'])} classes, input {meta['input_size']}")
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="image", sources=["upload", "clipboard"], elem_id="input")
                    mode = gr.Radio(["resize", "aspect", "slide"], value=meta["default_mode"], label="mode",
                                    info="resize: the processor's square; aspect: short side = input size; "
                                         "slide: windows at full resolution")
                    alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="overlay opacity")
                    button = gr.Button("Segment", variant="primary", elem_id="segment")
                    gr.Examples(samples, inputs=image, label="samples")
                with gr.Column():
                    shown = gr.Image(type="pil", label="overlay", format="png", interactive=False, elem_id="overlay")
                    legend = gr.HTML(elem_id="legend")
                    areas = gr.Dataframe(headers=["class", "pixels", "% of image", "mean confidence"],
                                         label="areas", elem_id="areas", interactive=False)
                    confidence = gr.Image(type="pil", label="confidence (top class probability: white = 1)",
                                          format="png", interactive=False, elem_id="confidence")
            outputs = [shown, legend, areas, confidence]
            button.click(self.segment, [image, mode, alpha], outputs)
            image.upload(self.segment, [image, mode, alpha], outputs)
        return blocks


def theme():
    import gradio as gr
    return gr.themes.Default(font=FONTS, font_mono=MONO)


def build(args):
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("app.py needs Gradio: pip install -e '.[demo]'") from None
    from serving.segmenter import Segmenter
    segmenter = Segmenter.load(args.checkpoint, trust_code=args.trust_code, threads=args.threads, size=args.size,
                               device=args.device)
    return Demo(segmenter).blocks(sample_images(args.examples))


def main(args) -> int:
    blocks = build(args)
    blocks.launch(server_name=args.host, server_port=args.port or free_port(args.host), theme=theme(),
                  ssr_mode=False, footer_links=[])
    return 0


def free_port(host: str) -> int:
    import socket
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(run_main(lambda: main(get_args())))
