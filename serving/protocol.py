"""A segmentation request and its answer, apart from any web framework.

The contract is the Hugging Face Inference API's image-segmentation task, so that its clients work unchanged:
the image's bytes in (the raw body, or a multipart form's field `image`), and out a JSON list with one entry
per class present, as `pipeline("image-segmentation")` returns it and the API serialises it:

    [{"label": "wall", "score": 0.93, "mask": "<base64 PNG, mode L: 255 inside the class, 0 outside>"}, ...]

The score is the segment's mean top-class probability (the pipeline gives None for semantic segmentation;
the API's clients expect a float). `Accept: image/png` answers the label map itself, the class ids as
infer.py writes `<stem>_mask.png`. Query options:

    mode=resize|aspect|slide     the Predictor's inference mode (default: the service's)
    output=segments|mask|overlay what to answer (default: segments, or mask under Accept: image/png)
    alpha=0..1                   the overlay's opacity

Every request that cannot be answered is a `BadRequest` with an HTTP status and one line naming what was
wrong and what is expected; the web layers turn it into `{"error": "<line>"}`.
"""

import base64
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from segformer.errors import UserError
from segformer.images import decode, to_rgb
from segformer.visual import label_map_image, overlay

MODES = ("resize", "aspect", "slide")
OUTPUTS = ("segments", "mask", "overlay")
RAW_TYPES = ("image/", "application/octet-stream",
             "application/x-www-form-urlencoded")  # curl --data-binary's default: the Inference API takes it too
MULTIPART = "multipart/form-data"


class BadRequest(Exception):
    """A request the service refuses: its HTTP status (4xx) and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may bring: its body's bytes and its image's pixels (a decompression bomb, a few KB
    that decode to gigabytes, is refused from its header, before it is decoded)."""
    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # about 8660 x 5770; PIL's own bomb limit is 179 M

    def describe(self) -> dict:
        return {"max_body_bytes": self.max_bytes, "max_pixels": self.max_pixels}


@dataclass(frozen=True)
class Options:
    """A request's query options, checked."""
    mode: str
    output: str
    alpha: float

    @property
    def media_type(self) -> str:
        return "application/json" if self.output == "segments" else "image/png"


def parse_options(query: list[tuple[str, str]], accept: str | None, *, default_mode: str = "resize",
                  default_alpha: float = 0.5) -> Options:
    """The query's (name, value) pairs, each known and given once, and the Accept header -> Options."""
    given = {}
    for name, value in query:
        if name not in ("mode", "output", "alpha"):
            raise BadRequest(400, f"unknown query option {name!r}: expected mode, output or alpha")
        if name in given:
            raise BadRequest(400, f"query option {name!r} given twice")
        given[name] = value
    mode = given.get("mode", default_mode)
    if mode not in MODES:
        raise BadRequest(400, f"query option mode={mode!r}: expected one of {', '.join(MODES)}")
    output = given.get("output", "mask" if wants_png(accept) else "segments")
    if output not in OUTPUTS:
        raise BadRequest(400, f"query option output={output!r}: expected one of {', '.join(OUTPUTS)}")
    try:
        alpha = float(given.get("alpha", default_alpha))
    except ValueError:
        raise BadRequest(400, f"query option alpha={given['alpha']!r}: expected a number in 0..1") from None
    if not 0 <= alpha <= 1:
        raise BadRequest(400, f"query option alpha={alpha}: expected a number in 0..1")
    options = Options(mode, output, alpha)
    if accept and not accepts(accept, options.media_type):
        raise BadRequest(406, f"output={output} is {options.media_type}, which the Accept header ({accept}) refuses")
    return options


def accepted_kinds(accept: str | None) -> list[str]:
    """The media types an Accept header names, in its order, without their parameters."""
    return [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]


def wants_png(accept: str | None) -> bool:
    """Accept names image/png (and not JSON before it)."""
    kinds = accepted_kinds(accept)
    return "image/png" in kinds and ("application/json" not in kinds
                                     or kinds.index("image/png") < kinds.index("application/json"))


def accepts(accept: str, media: str) -> bool:
    major = media.split("/")[0]
    return any(kind in (media, f"{major}/*", "*/*", "") for kind in accepted_kinds(accept))


def body_kind(content_type: str | None) -> str:
    """'raw' (the body is the image) or 'multipart' (a form with a field `image`), by the Content-Type; any
    other type is refused (415)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if not kind or any(kind.startswith(t) for t in RAW_TYPES):
        return "raw"
    if kind == MULTIPART:
        return "multipart"
    raise BadRequest(415, f"Content-Type {kind!r}: expected the image's bytes (image/*, application/octet-stream) "
                          f"or {MULTIPART} with a field 'image'")


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """The body's bytes -> the RGB image the model sees (decoded as infer.py decodes a file: EXIF orientation,
    any mode to RGB), or a BadRequest: empty (400), over the byte limit (413), not an image (400), more pixels
    than the limit (413, from the header alone), truncated or corrupt (400)."""
    if not data:
        raise BadRequest(400, "the request has no image: send the image's bytes as the body, or a multipart "
                              "form with a field 'image'")
    if len(data) > limits.max_bytes:
        raise BadRequest(413, f"the image is {len(data)} bytes; this service takes at most {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours, just below
            with Image.open(io.BytesIO(data)) as header:
                width, height, kind = header.width, header.height, header.format
    except Image.DecompressionBombError as e:  # past twice PIL's own limit, PIL refuses to open it at all
        raise BadRequest(413, f"the image's header claims too many pixels ({e}); this service takes at most "
                              f"{limits.max_pixels}") from None
    except Exception as e:  # not an image at all (PIL reads the header only)
        raise BadRequest(400, f"the body is not an image PIL can read ({type(e).__name__}): expected PNG, "
                              f"JPEG, WebP, TIFF, BMP or GIF bytes") from None
    if width * height > limits.max_pixels:
        raise BadRequest(413, f"the {kind} image is {width} x {height} = {width * height} pixels; this service "
                              f"takes at most {limits.max_pixels}")
    try:
        return to_rgb(decode(data, f"the {kind} image"))
    except UserError as e:  # truncated, corrupt: decode names what PIL found
        raise BadRequest(400, str(e)) from None


def segments(prediction) -> list[dict]:
    """The Inference API's answer: one {"label", "score", "mask"} per class present, the mask a base64 PNG."""
    return [{"label": s["label"], "score": s["score"], "mask": base64.b64encode(png(s["mask"])).decode("ascii")}
            for s in prediction.segments]


def answer(prediction, image: Image.Image, options: Options, *, colours, names: dict) -> bytes:
    """The answer's body, of `options.media_type`."""
    label_map = prediction.label_map.cpu().numpy()
    if options.output == "segments":
        return json.dumps(segments(prediction)).encode()
    if options.output == "mask":
        return png(label_map_image(label_map, len(names)))
    return png(overlay(image, label_map, colours, names, options.alpha))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(text: str) -> np.ndarray:
    """A segment's base64 mask back to a boolean (H, W) array (what a client does; the tests use it)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))) == 255
