"""The eager runtime: the `SegFormer` module itself, run by PyTorch on any device.

Its runner loads a checkpoint (a folder, a weights file or a hub id) in any weight layout; its writer is the
checkpoint itself: `save_pretrained` (model.safetensors + config.json, which transformers loads too) with the
side files inference reads (preprocessor_config.json, palette.json, calibration.json where it was fitted).
"""

from pathlib import Path

from ..calibration import CALIBRATION_FILE
from ..checkpoint import describe, write_preprocessor_config
from ..files import write_json, writable_folder
from ..model import SegFormer


def load(source: str | Path, *, trust_code: bool = False, threads: int | None = None):
    """(SegFormer in eval mode, what its files say) of a checkpoint."""
    facts = describe(source)
    classes = facts.segmentation_classes()  # an encoder only cannot segment: said before the weights are read
    model = SegFormer.from_pretrained(facts, trust_code=trust_code).eval()
    return model, {"class_names": classes, "size": facts.size, "reduce_labels": facts.reduce_labels,
                   "palette": facts.palette, "bands": facts.bands, "temperature": facts.temperature,
                   "checkpoint": facts}


def write(model: SegFormer, facts, out: Path, options=None) -> Path:
    """The model as a checkpoint folder that this runtime (and transformers) loads, with its side files."""
    out = writable_folder(out)
    model.save_pretrained(out)
    write_preprocessor_config(out, size=facts.size, reduce_labels=facts.reduce_labels, bands=facts.bands)
    write_json([list(c) for c in facts.palette], out / "palette.json")
    if facts.temperature:
        write_json({"temperature": facts.temperature}, out / CALIBRATION_FILE)
    print(f"wrote {model.config.describe()} ({len(facts.class_names)} classes) to {out}/")
    return out
