"""export.py --runtime executorch: an XNNPACK-delegated ExecuTorch program (.pte) against eager at its size,
another size refused, infer.py on it.

Run by tests/test_executorch.py, in a process of its own (helpers.run_isolated says why).
"""

import numpy as np
import pytest
import torch
from PIL import Image

import export
import infer
from helpers import random_image, shallow_checkpoint
from segformer.errors import ConfigError
from segformer.runtimes import graph, load_for_inference


def test_an_executorch_program_runs_like_eager_at_its_size(tmp_path, capsys):
    """XNNPACK-delegated, one static shape: any batch (one image at a time), another size refused by name."""
    model, folder = shallow_checkpoint(tmp_path / "checkpoint")
    export.export_checkpoint(str(folder), tmp_path / "et", runtime="executorch")
    program, facts = load_for_inference(tmp_path / "et" / "model.pte")
    assert facts.runtime == "executorch"
    assert graph.largest_difference(program, model, [(3, 3, 64, 64)]) <= 1e-4
    with pytest.raises(ConfigError, match=r"model\.pte takes 3x64x64 inputs .*got 3x64x96"):
        program(torch.randn(1, 3, 64, 96))
    random_image(50, 70, seed=0).save(tmp_path / "image.png")
    for source, name in ((tmp_path / "et" / "model.pte", "et"), (folder, "torch")):
        assert infer.main(infer.get_args(["--checkpoint", str(source), str(tmp_path / "image.png"),
                                          "--out", str(tmp_path / f"{name}_masks")])) == 0
    et, torch_ = (np.asarray(Image.open(tmp_path / f"{name}_masks" / "image_mask.png")) for name in ("et", "torch"))
    assert et.shape == (50, 70) and (et == torch_).mean() > 0.999
    capsys.readouterr()
    assert infer.main(infer.get_args(["--checkpoint", str(tmp_path / "et" / "model.pte"), str(tmp_path / "image.png"),
                                      "--out", str(tmp_path / "aspect"), "--mode", "aspect"])) == 2
    err = capsys.readouterr().err.strip()
    assert "model.pte takes 64x64 inputs only" in err and len(err.splitlines()) == 1
    from serving.protocol import BadRequest
    from serving.segmenter import Segmenter
    segmenter = Segmenter.load(str(tmp_path / "et" / "model.pte"))  # serve.py's: the modes it can run
    assert segmenter.metadata()["modes"] == ["resize"]
    with pytest.raises(BadRequest, match="mode=aspect: .*model.pte takes 64x64 inputs only") as refused:
        segmenter.predict("aspect", [random_image(50, 70, seed=0)])
    assert refused.value.status == 400


