"""A runtime written outside the library, as a contributor would add one: the model run in float64.
Its writer is the eager checkpoint plus a marker file `model.f64`; its runner loads the checkpoint beside the
marker and runs it in double precision. test_extending.py adds it as one row of RUNTIMES."""

from pathlib import Path

import torch

from segformer.runtimes import eager


class Float64Model:
    def __init__(self, model):
        self.model, self.id2label = model.double().eval(), model.id2label

    def __call__(self, pixel_values):
        return self.model(pixel_values.double()).float()

    def eval(self):
        return self

    def to(self, device=None, memory_format=None):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("the float64 toy runs on the CPU")
        return self


def write(model, facts, out: Path, options=None) -> Path:
    eager.write(model, facts, out)
    (Path(out) / "model.f64").write_text("float64\n")
    return Path(out) / "model.f64"


def load(source, *, trust_code=False, threads=None):
    model, said = eager.load(Path(source).parent, trust_code=trust_code)
    return Float64Model(model), said
