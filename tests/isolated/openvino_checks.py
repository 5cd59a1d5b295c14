"""export.py --runtime openvino: fp32 against eager at any shape, bf16 and int8 in their precisions with the
labels' layers in float, infer.py on model.xml; and what each runtime's writer refuses, in one line.

Run by tests/test_openvino.py, in a process of its own (helpers.run_isolated says why).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import export
import infer
from helpers import random_image, shallow_checkpoint
from segformer.errors import CheckpointError
from segformer.runtimes import graph, load_for_inference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shallow_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def openvino_exports(checkpoint, tmp_path_factory):
    """The three precisions of one checkpoint (int8 calibrated on generated scenes)."""
    _, folder = checkpoint
    out = {}
    for precision in ("fp32", "bf16", "int8"):
        out[precision] = tmp_path_factory.mktemp(precision)
        export.export_checkpoint(str(folder), out[precision], runtime="openvino", precision=precision)
    return out


def test_openvino_fp32_equals_eager_at_any_batch_and_size(checkpoint, openvino_exports):
    """Forced to fp32 (on a CPU with bf16, OpenVINO's default would be bf16), at three shapes and the
    smallest SegFormer takes; each shape compiled once, the last few kept."""
    import openvino as ov

    from segformer.runtimes.openvino import SHAPES_KEPT
    model, _ = checkpoint
    ov_model, facts = load_for_inference(openvino_exports["fp32"] / "model.xml")
    assert facts.runtime == "openvino" and facts.size == 64 and facts.class_names == tuple(f"LABEL_{i}" for i in range(5))
    assert facts.palette[1] == (255, 0, 0)
    shapes = [(1, 3, 64, 64), (3, 3, 100, 130), (1, 3, 32, 40), (2, 3, 257, 199), (1, 3, 64, 64)]
    assert graph.largest_difference(ov_model, model, shapes) <= 1e-4
    assert len(ov_model.compiled) == SHAPES_KEPT and next(reversed(ov_model.compiled)) == (1, 3, 64, 64)
    for compiled in ov_model.compiled.values():
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def test_openvino_bf16_and_int8_keep_their_precision_and_the_labels_in_float(openvino_exports, capsys):
    import openvino as ov

    from segformer.runtimes.openvino import OpenVinoModel, bf16_supported
    x = torch.randn(1, 3, 64, 64)
    bf16, int8 = (OpenVinoModel(openvino_exports[p] / "model.xml") for p in ("bf16", "int8"))
    fp32 = OpenVinoModel(openvino_exports["fp32"] / "model.xml")
    assert (bf16.precision, int8.precision, fp32.precision) == ("bf16", "int8", "fp32")
    bf16(x)
    expected = ov.Type.bf16 if bf16_supported(ov.Core()) else ov.Type.f32
    assert bf16.compiled_for((1, 3, 64, 64)).get_property("INFERENCE_PRECISION_HINT") == expected
    quantized = {op.get_friendly_name() for op in int8.graph.get_ops() if op.get_type_name() == "FakeQuantize"}
    assert len(quantized) > 20  # every block's matrix products and convolutions
    assert not any(op.get_type_name() == "FakeQuantize" for op in fp32.graph.get_ops())
    classifier = next(op for op in int8.graph.get_ops() if "classifier" in op.get_friendly_name()
                      and op.get_type_name() == "Convolution")
    assert all(v.get_node().get_type_name() != "FakeQuantize" for v in classifier.input_values())  # float labels
    for precision in ("bf16", "int8"):
        agreement = graph.label_agreement(fp32, OpenVinoModel(openvino_exports[precision] / "model.xml"),
                                          export.check_images(None, 64, count=2))
        assert 0.5 < agreement <= 1.0


def test_infer_py_runs_an_openvino_model_like_the_checkpoint(checkpoint, openvino_exports, tmp_path):
    _, folder = checkpoint
    for i, (h, w) in enumerate([(60, 90), (75, 40)]):
        random_image(h, w, seed=i).save(tmp_path / f"image{i}.png")
    for source, name in ((openvino_exports["fp32"] / "model.xml", "ov"), (folder, "torch")):
        assert infer.main(infer.get_args(["--checkpoint", str(source), str(tmp_path / "image0.png"),
                                          str(tmp_path / "image1.png"), "--out", str(tmp_path / name),
                                          "--mode", "slide", "--window", "64", "--stride", "48"])) == 0
    for i in range(2):
        ov, torch_ = (np.asarray(Image.open(tmp_path / name / f"image{i}_mask.png")) for name in ("ov", "torch"))
        assert (ov == torch_).mean() > 0.999
    assert {s["label"] for s in json.loads((tmp_path / "ov" / "image0.json").read_text())["segments"]} <= \
        {f"LABEL_{i}" for i in range(5)}


@pytest.mark.parametrize("runtime, flags, said", [
    ("onnx", ["--precision", "bf16"], "--precision goes with --runtime openvino"),
    ("openvino", ["--label-map"], "--label-map is the ONNX export's"),
    ("openvino", ["--int8"], "--int8 is the ONNX export's; OpenVINO writes the logits graph (int8: --precision int8)"),
    ("openvino", ["--calibration-images", "."], "--calibration-images goes with --precision int8"),
    ("aoti", ["--precision", "int8"], "--precision is not AOTInductor's"),
    ("executorch", ["--portable"], "--portable is not ExecuTorch's"),
])
def test_each_runtime_refuses_what_it_cannot_write_in_one_line(checkpoint, tmp_path, capsys, runtime, flags, said):
    _, folder = checkpoint
    assert export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out"), "--runtime", runtime,
                        *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_model_is_named(tmp_path):
    for name, said in (("model.xml", "OpenVINO cannot read it"), ("model.pte", "ExecuTorch cannot load it")):
        (tmp_path / name).write_bytes(b"not a model")
        (tmp_path / "model.bin").write_bytes(b"")
        with pytest.raises(CheckpointError, match=f"{name}: {said}"):
            load_for_inference(tmp_path / name)
