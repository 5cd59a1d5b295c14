"""The model a service runs: loaded for inference from the library, one Predictor per inference mode, and
the answer to a request. serve.py, app.py and the Ray deployment each hold one.

    segmenter = Segmenter.load("runs/synthetic/best")               # a checkpoint, hub id or model.onnx
    predictions = segmenter.predict("resize", [image1, image2])       # one forward pass for both
    body = segmenter.respond(predictions[0], image1, options)         # serving.protocol's answer
"""

import torch
from PIL import Image

from segformer.device import check_device, resolve_amp
from segformer.errors import CheckpointError, ConfigError
from segformer.inference import NonFiniteLogits, Predictor
from segformer.runtimes import RUNTIMES, load_for_inference

from .protocol import MODES, BadRequest, Options, answer

PLAIN_IMAGE = Image.linear_gradient("L").convert("RGB")  # 256 x 256: the check at load, the service's warm-up


class Segmenter:
    def __init__(self, model, facts, *, device: str | None = None, amp: str = "off", batch_size: int = 8,
                 channels_last: bool = False, mode: str = "resize", window: int = 512, stride: int = 341,
                 memory_mb: int = 512):
        if facts.bands is not None:
            raise ConfigError(f"{facts.source} reads {facts.bands.count}-band images; the service takes 8-bit RGB "
                              f"images: segment multi-band files with infer.py")
        runtime = RUNTIMES[facts.runtime]
        device = torch.device(runtime.device(check_device(device) if device else None)
                              or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device, self.amp = device, resolve_amp(amp, device)
        self.facts, self.default_mode = facts, mode
        self.names, self.colours = dict(enumerate(facts.predicted_classes)), facts.palette
        self.predictors, self.refused_modes = {}, {}  # the modes share the model; each has its own settings
        for name in MODES:
            try:
                self.predictors[name] = Predictor(
                    model, **facts.predictor_options, mode=name, window=window, stride=stride, device=device,
                    amp=self.amp, batch_size=batch_size, memory_mb=memory_mb,
                    channels_last=channels_last and runtime.torch_module)
            except ConfigError as e:  # a graph of one input size runs some modes only; the default it must run
                if name == mode:
                    raise
                self.refused_modes[name] = str(e)

    @classmethod
    def load(cls, source: str, *, runtime: str | None = None, trust_code: bool = False, threads: int | None = None,
             size: int | None = None, **options) -> "Segmenter":
        """A checkpoint (folder, weights file, hub id) or an exported model, as infer.py loads it."""
        if threads:
            torch.set_num_threads(threads)
        model, facts = load_for_inference(source, size=size, trust_code=trust_code, runtime=runtime, threads=threads)
        segmenter = cls(model, facts, **options)
        segmenter.check()
        return segmenter

    def check(self) -> None:
        """One forward pass on a plain gradient image, before any client's: a model whose logits are not finite
        even there (weights finite but too large for float32, a graph exported from such weights) is one line
        naming it, not a service that answers every request with an error."""
        try:
            self.predict(self.default_mode, [PLAIN_IMAGE])
        except NonFiniteLogits:
            cause = f"{self.amp} autocast overflows (amp 'off' computes in float32)" if self.amp != "off" else \
                "its weights are finite but too large for float32 arithmetic"
            raise CheckpointError(f"{self.facts.source}: the model's logits are NaN or infinite on a plain gradient "
                                  f"image: {cause}") from None

    def check_mode(self, mode: str) -> None:
        """A mode this model cannot run (a graph of one input size) is the request's 400, with why."""
        if mode not in self.predictors:
            raise BadRequest(400, f"mode={mode}: {self.refused_modes.get(mode, 'not a mode')}")

    @torch.inference_mode()
    def predict(self, mode: str, images: list) -> list:
        """Predictions of the images, as the mode's Predictor makes them (in resize mode, one forward pass
        for all of them), each with its confidence (a segment's score)."""
        self.check_mode(mode)
        return self.predictors[mode](list(images), confidence=True)

    def respond(self, prediction, image, options: Options) -> bytes:
        return answer(prediction, image, options, colours=self.colours, names=self.names)

    def metadata(self) -> dict:
        facts = self.facts
        return {"source": facts.source, "runtime": facts.runtime, "runtime_name": RUNTIMES[facts.runtime].name,
                "device": str(self.device), "amp": self.amp, "input_size": facts.size,
                "default_mode": self.default_mode, "modes": list(self.predictors),
                "id2label": {str(i): name for i, name in self.names.items()},
                "palette": [list(c) for c in self.colours]}
