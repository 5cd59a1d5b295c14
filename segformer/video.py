"""Video: frames in from a file or a camera (PyAV, FFmpeg's libraries: `pip install av`), an overlay video
out at the input's frame rate, and temporal smoothing of the class probabilities.

    for frame in read_frames("street.mp4"):          # PIL RGB images; .rate is the stream's frame rate
        ...
    model = TemporalSmoothing(model, decay=0.6)      # any InferenceModel; then Predictor(model, ...)

A per-frame model flickers: a pixel near the boundary of two classes changes its label from one frame to
the next with sensor noise alone, though nothing moved (NVlabs/SegFormer #13). `TemporalSmoothing` keeps an
exponential moving average of each frame's class probabilities at the model's output resolution,

    p_t = decay * p_(t-1) + (1 - decay) * softmax(logits_t)

and hands the Predictor log p_t as the frame's logits, so the label map is the argmax of the averaged
probabilities (decay 0: the frame alone). It trades flicker for lag: a class that really appears takes
about 1 / (1 - decay) frames to win. It needs one forward pass per frame of one size (the resize and aspect
modes); a frame of another size starts a new average. `label_flicker` measures what it buys: the fraction
of pixels whose label changed since the previous frame.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, ConfigError
from .files import regular_file

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"})


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".")


def import_av():
    try:
        import av
    except ImportError:
        raise ConfigError("video needs PyAV (FFmpeg's libraries): pip install av, or pip install -e '.[video]'") \
            from None
    return av


class Frames:
    """The frames of a video file, or of a camera given by its index (Linux: /dev/video<index> through
    v4l2; macOS: avfoundation), as PIL RGB images; `rate` is the frame rate (a Fraction) and `count` the
    frame count where the container says it (else None). Use as a context manager, or call close()."""

    def __init__(self, source: str | Path | int):
        av = import_av()
        self.name = f"camera {source}" if isinstance(source, int) else str(source)
        try:
            if isinstance(source, int):
                device, form = ((f"/dev/video{source}", "v4l2") if Path("/dev").joinpath(f"video{source}").exists()
                                else (str(source), "avfoundation"))
                self.container = av.open(device, format=form)
            else:  # a regular file: FFmpeg would wait on a FIFO for ever (streamed: no size limit)
                regular_file(Path(source), error=DataError, expected="a video file", limit=None)
                self.container = av.open(str(source))
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError, OSError) as e:
            raise DataError(f"{self.name}: cannot read it as a video ({type(e).__name__}: {e})") from None
        self.stream.thread_type = "AUTO"  # FFmpeg decodes on several threads
        self.rate = Fraction(self.stream.average_rate or self.stream.guessed_rate or 25)
        self.count = self.stream.frames or None

    def __iter__(self):
        av = import_av()
        try:
            for frame in self.container.decode(self.stream):
                yield frame.to_image()  # RGB
        except av.FFmpegError as e:
            raise DataError(f"{self.name}: the video cannot be decoded past this point ({e})") from None

    def close(self):
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_frames(source: str | Path | int):
    """The frames of a file or a camera, as PIL RGB images (see `Frames`)."""
    with Frames(source) as frames:
        yield from frames


class VideoWriter:
    """An H.264 MP4 (MPEG-4 part 2 where FFmpeg has no H.264 encoder) at `rate` frames per second, written
    to `path` (a temporary file: see infer.py's atomic rename). Frames are (H, W, 3) uint8 arrays; odd sides
    are cropped by a pixel, as yuv420p needs even ones."""

    def __init__(self, path: str | Path, rate: Fraction, *, quality: int = 20):
        av = import_av()
        self.container = av.open(str(path), "w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": str(quality), "preset": "veryfast"}
        self.size = None

    def write(self, frame: np.ndarray) -> None:
        av = import_av()
        H, W = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
        if self.size is None:
            self.stream.height, self.stream.width = self.size = (H, W)
        elif (H, W) != self.size:
            raise DataError(f"a frame of {W} x {H} in a video of {self.size[1]} x {self.size[0]}")
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:H, :W]), format="rgb24")
        for packet in self.stream.encode(picture):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():  # what the encoder still holds
            self.container.mux(packet)
        self.container.close()


class TemporalSmoothing:
    """An InferenceModel whose logits are log of the moving average of the frames' class probabilities
    (the module docstring). Call `reset()` between videos."""

    def __init__(self, model, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"the decay must be in [0, 1), got {decay}")
        self.model, self.decay, self.id2label = model, decay, model.id2label
        self.average = None  # (B, K, h, w) probabilities of the frames so far

    def reset(self) -> None:
        self.average = None

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values).float()
        if logits.shape[1] == 1:  # the binary head: two classes, background and the label
            probabilities = torch.cat([(-logits).sigmoid(), logits.sigmoid()], 1)
        else:
            probabilities = logits.softmax(1)
        if self.average is None or self.average.shape != probabilities.shape:
            self.average = probabilities
        else:
            self.average = self.decay * self.average + (1 - self.decay) * probabilities
        averaged = self.average.clamp(min=1e-12).log()
        return averaged[:, 1:] - averaged[:, :1] if logits.shape[1] == 1 else averaged  # binary: the log-odds

    def eval(self):
        self.model = self.model.eval()
        return self

    def to(self, *args, **kwargs):
        self.model = self.model.to(*args, **kwargs)
        return self


def label_flicker(previous: torch.Tensor | None, current: torch.Tensor) -> float | None:
    """The fraction of pixels whose label differs from the previous frame's (None for the first frame)."""
    if previous is None or previous.shape != current.shape:
        return None
    return (previous != current).float().mean().item()
