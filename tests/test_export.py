"""export.py: ONNX graphs with dynamic batch and size, ONNX Runtime against eager, int8, infer.py --onnx."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import export
import infer
from helpers import random_image, randomize_
from segformer import SegFormer
from segformer.checkpoint import write_preprocessor_config
from segformer.files import write_json
from segformer.inference import Predictor
from segformer.errors import CheckpointError
from segformer.runtimes import onnx as onnx_runtime
from segformer.runtimes.onnx import onnx_session


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export (and its static int8 twin) of a random-weight checkpoint for 64x64 inputs, shared by the
    tests: B0 with one block per stage (every kind of module, half the tracing time)."""
    torch.manual_seed(0)
    model = randomize_(SegFormer.from_variant("b0", num_labels=5, depths=(1, 1, 1, 1)), seed=3).eval()
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(checkpoint)
    write_preprocessor_config(checkpoint, size=64, reduce_labels=False)
    write_json([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], checkpoint / "palette.json")
    out = tmp_path_factory.mktemp("exported")
    program = export.export_checkpoint(str(checkpoint), out, int8="static")
    return model, checkpoint, out, program


def test_onnx_runtime_equals_eager_at_two_shapes_from_one_export(exported):
    """Two shapes, and the smallest one SegFormer takes (32: stage 1's reduced key/value map is 1 x 1),
    below the 61 pixels the trace assumed."""
    model, _, out, _ = exported
    shapes = [(1, 3, 512, 512), (2, 3, 320, 480), (1, 3, 32, 40)]
    assert onnx_runtime.check_logits(model, out / "model.onnx", shapes) <= 1e-4
    operators = [(node.domain, node.op_type) for node in onnx.load(out / "model.onnx").graph.node]
    assert operators.count(("com.microsoft", "MultiHeadAttention")) == 4  # one per block: ONNX Runtime's kernel
    assert ("", "Softmax") not in operators


def test_the_torch_export_graph_serves_any_batch_and_size(exported):
    """For deployment without Python: the one graph torch.export traced (and ONNX was written from)
    serves any batch and image size, as eager does."""
    model, _, _, program = exported
    graph = program.exported_program.module()
    for shape in [(1, 3, 64, 96), (3, 3, 100, 130), (2, 3, 257, 199)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(graph(x), model(x), atol=1e-5)


def test_the_side_files_carry_size_labels_and_colours(exported):
    model, _, out, _ = exported
    assert sorted(p.name for p in out.iterdir()) == ["id2label.json", "model.int8.onnx", "model.onnx", "palette.json",
                                                     "preprocessor_config.json"]
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 64, "width": 64}
    assert json.loads((out / "preprocessor_config.json").read_text())["do_reduce_labels"] is False
    assert json.loads((out / "id2label.json").read_text()) == {str(i): f"LABEL_{i}" for i in range(5)}


def test_int8_is_written_with_its_measured_agreement(exported, tmp_path):
    """Static (the fixture's: calibrated, every convolution and matrix product int8) and dynamic."""
    _, _, out, _ = exported
    onnx_runtime.quantize_int8(out / "model.onnx", tmp_path / "dynamic.onnx")
    inputs = export.check_images(None, 64, count=2)
    for int8, kernels in ((out / "model.int8.onnx", {"QLinearConv", "QLinearMatMul"}),
                          (tmp_path / "dynamic.onnx", {"DynamicQuantizeLinear", "ConvInteger"})):
        assert 0.5 < onnx_runtime.mask_agreement(out / "model.onnx", int8, inputs) <= 1.0
        assert int8.stat().st_size < 0.5 * (out / "model.onnx").stat().st_size  # int8 weights
        optimised = tmp_path / f"{int8.stem}.optimised.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(optimised)  # the graph ONNX Runtime runs, after its fusions
        ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
        assert kernels <= {node.op_type for node in onnx.load(optimised).graph.node}


def test_infer_py_runs_the_exported_graph_like_the_checkpoint(exported, tmp_path):
    _, checkpoint, out, _ = exported
    for i, (h, w) in enumerate([(60, 90), (75, 40)]):
        random_image(h, w, seed=i).save(tmp_path / f"image{i}.png")
    for flag, source, folder in (("--onnx", out / "model.onnx", "ort"), ("--checkpoint", checkpoint, "torch")):
        assert infer.main(infer.get_args([flag, str(source), str(tmp_path / "image0.png"),
                                          str(tmp_path / "image1.png"), "--out", str(tmp_path / folder),
                                          "--mode", "slide", "--window", "64", "--stride", "48"])) == 0
    for i in range(2):
        ort, torch_ = (np.asarray(Image.open(tmp_path / folder / f"image{i}_mask.png")) for folder in ("ort", "torch"))
        assert (ort == torch_).mean() > 0.999
    segments = json.loads((tmp_path / "ort" / "image0.json").read_text())["segments"]
    assert {s["label"] for s in segments} <= {f"LABEL_{i}" for i in range(5)}


def test_a_label_map_graph_needs_no_numpy(tmp_path):
    """uint8 image in, label map at the image's own size out: the predictor's resize mode, in one graph;
    --portable, so in standard ONNX operators only."""
    torch.manual_seed(1)
    model = randomize_(SegFormer.from_variant("b0", num_labels=4, depths=(1, 1, 1, 1)), seed=5).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    write_preprocessor_config(tmp_path / "checkpoint", size=64, reduce_labels=True)
    assert export.main(["--checkpoint", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "out"),
                        "--label-map", "--portable"]) == 0  # the command line, this time
    assert {node.domain for node in onnx.load(tmp_path / "out" / "model.onnx").graph.node} == {""}  # any runtime
    session = onnx_session(tmp_path / "out" / "model.onnx")
    predictor = Predictor(model, size=64, device="cpu")
    for seed, (h, w) in enumerate([(70, 90), (41, 133)]):
        image = np.asarray(random_image(h, w, seed=seed))
        label_map = session.run(None, {"image": image.transpose(2, 0, 1)[None].copy()})[0][0]
        assert label_map.shape == (h, w) and label_map.dtype == np.int64
        assert (label_map == predictor(Image.fromarray(image)).label_map.numpy()).mean() > 0.99


def test_export_errors_are_one_line(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    SegFormer.from_variant("b0", num_labels=2).save_pretrained(tmp_path / "model")
    assert export.main(["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--label-map",
                        "--int8"]) == 2
    assert "--int8 goes with the logits graph" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                        "--calibration-images", str(tmp_path)]) == 2
    assert "--calibration-images goes with --int8 static" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # refused before the export, not with a traceback after it
    for flags in (["--int8", "static", "--calibration-images"], ["--int8", "--check-images"]):
        assert export.main(["--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "out"), *flags,
                            str(tmp_path / "empty")]) == 2
        assert f"{tmp_path / 'empty'}: no images in it" in capsys.readouterr().err
        assert not (tmp_path / "out" / "model.onnx").exists()
    from segformer.runtimes.onnx import OnnxModel
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(CheckpointError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        OnnxModel(tmp_path / "model.onnx")


def test_the_gpu_check_runs_every_path_on_the_cpu():
    """benchmarks/gpu_check.py --dry-run: the CUDA check's code, end to end, at tiny sizes."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--dry-run"], cwd=root,
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "PYTHONPATH": str(root)})
    failures = [line for line in done.stdout.splitlines() if "FAIL" in line]  # each with its error, for CI's log
    assert done.returncode == 0, "\n".join(failures) + "\n" + done.stderr[-3000:]
    assert "5/5 checks passed" in done.stdout  # the export check is this file's other tests' work
    for check in ("parity", "amp", "train.py", "torchrun", "predictor"):
        assert f"{check:12}PASS" in done.stdout
