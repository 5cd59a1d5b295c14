"""Token merging (segformer/token_merging.py, SegFormer++'s attention) on the weights of a trained model: off,
it is SegFormer bit for bit; on, the same output shape within a bounded difference; the merge itself; and its
ONNX graph (at a static size) against eager."""

import pytest
import torch

from helpers import randomize_
from segformer import SegFormer
from segformer.errors import CheckpointError
from segformer.token_merging import bipartite_merge, set_token_merging


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(stock, tome): a random-weight B0 checkpoint, loaded as it is and with attention="tome"."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoint")
    randomize_(SegFormer.from_variant("b0", num_labels=7), seed=2).save_pretrained(folder)
    return SegFormer.from_pretrained(folder).eval(), SegFormer.from_pretrained(folder, attention="tome").eval(), \
        folder


def test_off_it_is_segformer_bit_for_bit_and_on_the_same_shape_within_a_bound(models):
    stock, tome, _ = models
    x = torch.randn(2, 3, 256, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stock(x)
        assert set_token_merging(tome, kv_ratio=0, q_ratio=0) == 8  # every block's attention
        assert torch.equal(tome(x), expected)
        set_token_merging(tome, kv_ratio=0.6, q_ratio=0.8)  # SegFormer++'s high-quality preset
        merged = tome(x)
    assert merged.shape == expected.shape
    with torch.no_grad():  # an image smaller than a window of the last stages (2 x 2 tokens there)
        assert tome(torch.randn(1, 3, 64, 64)).shape == (1, 7, 16, 16)
    difference = (merged - expected).abs()
    assert 0 < difference.max() < 0.25 * expected.abs().max()  # it changed something, and not everything
    assert (merged.argmax(1) == expected.argmax(1)).float().mean() > 0.9


def test_the_merge_averages_similar_tokens_and_unmerge_gives_every_token_back():
    # a 4 x 4 grid, 2 x 2 windows: 4 destinations (each window's top-left), 12 sources; half the tokens merge
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=g)
    merge, unmerge = bipartite_merge(x, 4, 4, 0.5, 2)
    merged = merge(x)
    assert merged.shape == (1, 8, 8)  # 16 - 8
    restored = unmerge(merged)
    assert restored.shape == x.shape
    # every token gets its group's value back: 8 groups, and each group's value is the mean of its tokens
    groups = {}
    for i in range(16):
        groups.setdefault(tuple(restored[0, i].tolist()), []).append(i)
    assert len(groups) == 8 and sum(len(members) > 1 for members in groups.values()) >= 1
    for value, members in groups.items():
        torch.testing.assert_close(x[0, members].mean(0), torch.tensor(value))
    # tokens that are copies of their window's destination merge without changing anything
    windows = x.view(1, 2, 2, 2, 2, 8)[:, :, :1, :, :1].expand(1, 2, 2, 2, 2, 8).reshape(1, 16, 8)
    merge, unmerge = bipartite_merge(windows, 4, 4, 0.75, 2)
    assert merge(windows).shape == (1, 4, 8) and torch.equal(unmerge(merge(windows)), windows)
    # a grid smaller than one window has no destination: the tokens pass as they are (a 64x64 image's stage 4)
    merge, unmerge = bipartite_merge(x[:, :4], 2, 2, 0.8, 4)
    assert torch.equal(merge(x[:, :4]), x[:, :4]) and torch.equal(unmerge(x[:, :4]), x[:, :4])
    # the ratio is capped at the sources' share: every source at most
    assert bipartite_merge(x, 4, 4, 1.0, 2)[0](x).shape == (1, 4, 8)


def test_a_stock_checkpoint_loads_with_token_merging_and_no_other_attention(models):
    _, _, folder = models
    with pytest.raises(CheckpointError, match="holds b0, not b0 with attention linear"):
        SegFormer.from_pretrained(folder, attention="linear")


def test_the_onnx_graph_at_a_static_size_matches_eager(models, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, tome, _ = models
    set_token_merging(tome, kv_ratio=0.6, q_ratio=0.8)
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(3))
    torch.onnx.export(tome, (x,), str(tmp_path / "tome.onnx"), dynamo=True, input_names=["pixel_values"],
                      output_names=["logits"])
    session = ort.InferenceSession(str(tmp_path / "tome.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = tome(x)
    assert (torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0]) - expected).abs().max() < 1e-4


def test_export_py_says_in_one_line_how_to_export_a_merging_model(tmp_path, capsys):
    import export
    from segformer.checkpoint import write_preprocessor_config
    SegFormer.from_variant("b0", num_labels=3, attention="tome", depths=(1, 1, 1, 1)).save_pretrained(tmp_path / "m")
    write_preprocessor_config(tmp_path / "m", size=64, reduce_labels=False)
    assert export.main(["--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert "merges tokens (attention tome)" in error and "torch.onnx.export(model" in error


def test_infer_py_merges_tokens_of_a_trained_checkpoint_in_place(models, tmp_path, capsys):
    import infer
    from helpers import random_image
    from segformer.checkpoint import write_preprocessor_config
    from segformer.token_merging import TokenMergingAttention, enable_token_merging
    stock, tome, folder = models
    write_preprocessor_config(folder, size=128, reduce_labels=False)
    random_image(200, 300, seed=0).save(tmp_path / "photo.png")
    assert infer.main(infer.get_args(["--checkpoint", str(folder), str(tmp_path / "photo.png"), "--out",
                                      str(tmp_path / "merged"), "--token-merging", "0.6", "0.8"])) == 0
    assert (tmp_path / "merged" / "photo_mask.png").exists()
    # in place on a loaded model: the same as loading with attention="tome"
    model = SegFormer.from_pretrained(folder).eval()
    assert enable_token_merging(model, kv_ratio=0.6, q_ratio=0.8) == 8 and model.config.attention == "tome"
    assert all(type(m.attn) is TokenMergingAttention for s in model.encoder.stages for m in s.blocks)
    set_token_merging(tome, kv_ratio=0.6, q_ratio=0.8)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x), tome(x))
    # an exported graph has no attention modules to merge: one line
    import export
    assert export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    assert infer.main(infer.get_args(["--onnx", str(tmp_path / "onnx" / "model.onnx"), str(tmp_path / "photo.png"),
                                      "--out", str(tmp_path / "o"), "--token-merging", "0.6", "0.8"])) == 2
    assert capsys.readouterr().err.startswith("error: --token-merging: ")
