"""Modify the architecture without a fork: the seams, the built-in alternatives, parts of one's own by import
path, and every tool (train, resume, --eval-only, infer, export, the tour) rebuilding the variant from its
checkpoint alone. The README's three worked examples are the first three tests."""

import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import explain
import export
import infer
import train
import custom_parts
from custom_parts import LightHead, ScaleNorm, TalkingHeadsAttention
from helpers import random_image, read_log, run_training
from segformer import SegFormer
from segformer.attention import EfficientSelfAttention, FullSelfAttention, LinearReductionAttention
from segformer.checkpoint import describe
from segformer.errors import CheckpointError

QUICK = ["--train-split", "train[:8]", "--eval-split", "validation[:4]", "--size", "64", "--batch-size", "2",
         "--warmup-steps", "0", "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--max-steps", "2",
         "--no-plots"]


@pytest.fixture()
def one_block(tmp_path):
    """B0 with one block per stage (every kind of module, half the export's tracing time): `--model` takes a
    config.json of one's own."""
    (tmp_path / "one_block.json").write_text(json.dumps({"depths": [1, 1, 1, 1]}))
    return ["--model", str(tmp_path / "one_block.json")]


def every_tool_understands(checkpoint, tmp_path, *, trust=(), exports=True):
    """The checkpoint alone rebuilds the model it holds: reloads to the same weights and logits, --eval-only
    reproduces the run's last evaluation, infer.py segments, export.py writes a graph ONNX Runtime runs
    like eager (or says why not; exports=None: not tried, where the graph holds nothing the stock one does
    not), and the tour draws."""
    model = SegFormer.from_pretrained(checkpoint, trust_code=bool(trust)).eval()
    model.save_pretrained(tmp_path / "again")
    again = SegFormer.from_pretrained(tmp_path / "again", trust_code=bool(trust)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    logged = [r for r in read_log(checkpoint.parent) if "mean_iou" in r][-1]
    metrics = train.execute(["--eval-only", "--checkpoint", str(checkpoint), *trust])
    assert metrics["mean_iou"] == logged["mean_iou"]
    random_image(40, 56).save(tmp_path / "photo.png")
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(tmp_path / "photo.png"), "--out",
                                      str(tmp_path / "predictions"), *trust])) == 0
    if exports is not None:
        code = export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported"), *trust])
        assert code == (0 if exports else 1)
    assert explain.main([str(tmp_path / "photo.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "tour"),
                         *trust]) == 0
    assert (tmp_path / "tour" / "tour.png").is_file()
    return model


# ---- the README's three worked examples -----------------------------------------------------------------

def test_example_swap_the_attention(tmp_path, one_block):
    """python train.py --attention linear: PVTv2's linear spatial-reduction attention in every block."""
    run_training(tmp_path / "run", "--attention", "linear", *one_block, base=QUICK)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["segformer_parts"] == {"attention": "linear"}
    model = every_tool_understands(checkpoint, tmp_path)
    assert all(isinstance(block.attn, LinearReductionAttention) for stage in model.encoder.stages
               for block in stage.blocks)
    assert "model.onnx" in {p.name for p in (tmp_path / "exported").iterdir()}


def test_example_swap_the_decoder(tmp_path, one_block):
    """python train.py --decoder mmseg: mmsegmentation 1.x's head, BatchNorm and ReLU on every level."""
    run_training(tmp_path / "run", "--decoder", "mmseg", *one_block, base=QUICK)
    model = every_tool_understands(tmp_path / "run" / "checkpoint-2", tmp_path, exports=None)  # convolutions,
    # BatchNorm and ReLU: a graph of standard operators, as the export tests' (the suite's time for others)
    assert type(model.decoder).__name__ == "MMSegHead" and len(model.decoder.convs) == 4


def test_example_a_variant_of_your_own_depths_and_widths(tmp_path):
    """python train.py --model my_variant.json: other depths, widths, heads and decoder width."""
    variant = {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 96], "num_heads": [1, 2, 4, 4],
               "decoder_hidden_size": 64}
    (tmp_path / "my_variant.json").write_text(json.dumps(variant))
    run_training(tmp_path / "run", "--model", str(tmp_path / "my_variant.json"), base=QUICK)
    model = every_tool_understands(tmp_path / "run" / "checkpoint-2", tmp_path, exports=None)  # the stock
    # parts at other sizes: the export tests' graph, whose dynamic shapes take any width
    assert (model.config.depths, model.config.hidden_sizes) == ((1, 1, 1, 1), (16, 32, 64, 96))
    assert model.config.variant is None and model.config.parts == {}


# ---- parts of one's own, by import path ------------------------------------------------------------------

def test_parts_of_your_own_go_through_every_tool(tmp_path, capsys, one_block):
    """A module written outside the project, given by import path: train -> resume -> --eval-only -> infer ->
    export -> the tour, with no edit to the project; code a checkpoint names is imported with --trust-code
    only, and a part a tool cannot look into is one line."""
    parts = ["--attention", "custom_parts:TalkingHeadsAttention", "--decoder", "custom_parts:LightHead"]
    run_training(tmp_path / "run", *parts, *one_block, base=QUICK)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["segformer_parts"] == {
        "attention": "custom_parts:TalkingHeadsAttention", "decoder": "custom_parts:LightHead"}
    card = (checkpoint / "README.md").read_text()  # the model card says what loads it, and what does not
    assert "not with `transformers`" in card and "trust_code=True" in card and "SegformerForSemantic" not in card
    with pytest.raises(CheckpointError, match=r"config\.json names code from outside this project \(attention "
                                              r"custom_parts:TalkingHeadsAttention, decoder custom_parts:LightHead\): "
                                              r"import it only if you trust the checkpoint, with --trust-code"):
        train.execute(["--resume", str(checkpoint), "--max-steps", "3"])
    train.execute(["--resume", str(checkpoint), "--max-steps", "4", "--trust-code"])
    capsys.readouterr()
    model = every_tool_understands(tmp_path / "run" / "checkpoint-4", tmp_path, trust=["--trust-code"])
    assert isinstance(model.encoder.stages[0].blocks[0].attn, TalkingHeadsAttention)
    out = capsys.readouterr().out
    assert "note: the attention custom_parts:TalkingHeadsAttention has no attention_weights(x, H, W)" in out
    assert "note: the decoder custom_parts:LightHead has no level_terms(features)" in out


def test_a_part_that_cannot_be_built_is_one_line(tmp_path, capsys):
    for parts, message in ((["--attention", "custom_parts:Nowhere"], r"attention custom_parts:Nowhere: custom_parts "
                                                                       r"has no Nowhere"),
                           (["--decoder", "no_such_package:Head"], r"decoder no_such_package:Head: cannot import "
                                                                    r"no_such_package"),
                           (["--norm", "json:loads"], r"norm json:loads: not a torch\.nn\.Module class"),
                           (["--attention", "sparse"], r"attention 'sparse': not a built-in attention \(efficient, "
                                                       r"linear, full, tome\)")):
        assert train.main(QUICK + ["--out", str(tmp_path / "run"), *parts]) == 2
        error = capsys.readouterr().err
        assert re.search(rf"^error: {message}", error) and error.count("\n") == 1, error


def test_a_part_that_returns_the_wrong_shape_is_named_with_the_shapes(tmp_path, capsys):
    """Checked when the model is built (one 64x64 forward, for parts of one's own only): the part, what it
    returned, what it was given and what its seam expects, in one line, not a size mismatch in the next layer."""
    for parts, message in (
            (["--attention", "custom_parts:HalfWidthAttention"],
             r"attention custom_parts:HalfWidthAttention: returned \(1, 256, 16\) for an input of \(1, 256, 32\); "
             r"the attention seam expects \(B, N, C\): the tokens' shape it was given, here \(1, 256, 32\)"),
            (["--attention", "custom_parts:TransposedAttention"],
             r"attention custom_parts:TransposedAttention: returned \(1, 32, 256\) for an input of \(1, 256, 32\)"),
            (["--decoder", "custom_parts:ThreeClassHead"],
             r"decoder custom_parts:ThreeClassHead: returned \(1, 3, 16, 16\) for an input of \[\(1, 32, 16, 16\), "
             r"\(1, 64, 8, 8\), \(1, 160, 4, 4\), \(1, 256, 2, 2\)\]; the decoder seam expects \(B, num_labels, "
             r"H/4, W/4\): one logit per class at the first map's size, here \(1, 7, 16, 16\)")):
        assert train.main(QUICK + ["--out", str(tmp_path / "run"), *parts]) == 2
        error = capsys.readouterr().err
        assert re.search(rf"^error: {message}", error) and error.count("\n") == 1, error
    with pytest.raises(Exception, match="HalfWidthAttention: returned"):
        SegFormer.from_variant("b0", num_labels=3, attention=custom_parts.HalfWidthAttention)
    SegFormer.from_variant("b0", num_labels=3, attention=TalkingHeadsAttention)  # a right one passes


def test_a_checkpoint_loads_into_the_architecture_it_holds_only(tmp_path):
    """A variant's weights never go silently into another architecture: loading asks for its own parts."""
    torch.manual_seed(0)
    SegFormer.from_variant("b0", num_labels=3, attention="full").save_pretrained(tmp_path / "full")
    assert describe(tmp_path / "full").config.parts == {"attention": "full"}
    assert "segformer.encoder.block.0.0.attention.self.query.weight" not in load_file(tmp_path / "full" /
                                                                                       "model.safetensors")
    with pytest.raises(CheckpointError, match=r"full holds b0 with attention full, not b0: a checkpoint loads into "
                                              r"the model it was trained as"):
        SegFormer.from_pretrained(tmp_path / "full", attention="efficient")
    SegFormer.from_variant("b0", num_labels=3).save_pretrained(tmp_path / "stock")
    with pytest.raises(CheckpointError, match=r"stock holds b0, not b0 with attention linear"):
        run_training(tmp_path / "run", "--pretrained", str(tmp_path / "stock"), "--attention", "linear",
                     "--num-labels", "3", "--no-reduce-labels", base=QUICK)
    loaded = SegFormer.from_pretrained(tmp_path / "full")  # its own parts: fine
    assert isinstance(loaded.encoder.stages[0].blocks[0].attn, FullSelfAttention)


def test_optimizer_groups_follow_the_structure_not_the_names():
    """A swapped head keeps its learning-rate multiplier and a norm of one's own its exemption from weight
    decay: the parts are found by what they are (model.decoder, the model's norm class), not by names."""
    from training.train_config import TrainConfig
    model = SegFormer.from_variant("b0", num_labels=3, decoder=LightHead, norm=ScaleNorm)
    config = TrainConfig(head_lr_mult=10.0, decay_norm_bias=False)
    groups = {g["name"]: g for g in train.get_optimizer(config, model).param_groups}
    of = {id(p): name for name, group in groups.items() for p in group["params"]}
    assert {of[id(p)] for p in model.decoder.parameters()} == {"head"} and groups["head"]["lr"] == 1e-2
    norms = [m for m in model.modules() if isinstance(m, ScaleNorm)]
    assert norms and {of[id(m.scale)] for m in norms} == {"encoder, no decay"}
    assert groups["encoder, no decay"]["weight_decay"] == 0.0


# ---- the seams and the built-in alternatives -------------------------------------------------------------

@pytest.mark.parametrize("parts", [{}, {"attention": "linear"}, {"attention": "full"}, {"decoder": "mmseg"},
                                   {"norm": "rms_norm", "activation": "silu"},
                                   {"attention": TalkingHeadsAttention, "decoder": LightHead}, {"norm": ScaleNorm}])
def test_every_part_trains_and_reports_its_shapes(parts):
    """Each alternative: quarter-resolution logits at an odd size, every parameter reached by the gradient,
    and the encoder's declared widths. (A scale-invariant norm is tried with the decoder that reads every
    stage: a LightHead reads the first and last stages only, so a middle stage's norm scale is cancelled by
    the next stage's norm and its gradient is zero up to rounding.)"""
    torch.manual_seed(0)
    model = SegFormer.from_variant("b0", num_labels=5, depths=(1, 1, 1, 1), **parts).train()
    logits = model(torch.randn(2, 3, 67, 91))
    assert logits.shape == (2, 5, 17, 23) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    features = model.forward_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == model.encoder.channels


def test_the_alternatives_compute_what_their_papers_say():
    """PVTv2's linear attention: keys from the 7 x 7 average pool, whatever the map; full attention: from every
    token; SegFormer's: from the map reduced by sr_ratio (the checkpoint's module names kept)."""
    torch.manual_seed(0)
    x, H, W = torch.randn(2, 13 * 29, 32), 13, 29
    common = dict(num_heads=2, sr_ratio=4, attention_dropout=0.0, dropout=0.0)
    linear = LinearReductionAttention(32, **common).eval()
    weights, grid = linear.attention_weights(x, H, W)
    assert grid == (7, 7) and weights.shape == (2, 2, 13 * 29, 49)
    pooled = nn.functional.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 32, H, W), 7)
    expected = linear.act(linear.sr_norm(linear.sr(pooled).flatten(2).transpose(1, 2)))
    assert torch.allclose(linear.reduce(x, H, W)[0], expected, atol=1e-6)
    assert FullSelfAttention(32, **common).attention_weights(x, H, W)[1] == (13, 29)
    efficient = EfficientSelfAttention(32, **common)
    assert efficient.attention_weights(x, H, W)[1] == (3, 7)
    assert [name for name, _ in efficient.named_children()] == ["q", "k", "v", "sr", "sr_norm", "proj", "proj_drop"]
    for attention in (linear, efficient):  # the fused kernel computes the softmax written out
        q, k, v, _ = attention.project(x, H, W)
        manual = attention.attention_weights(x, H, W)[0] @ v
        y = attention.proj(manual.transpose(1, 2).reshape(2, -1, 32))
        assert torch.allclose(attention.eval()(x, H, W), y, atol=1e-5)


def test_forward_intermediates_are_the_models_own_computation():
    """Every stage map, block output, attention and decoder term comes from the one forward, no hooks: the
    stage maps are the encoder's, the logits the model's, and the decoder's terms add up to its fused map."""
    torch.manual_seed(0)
    model = SegFormer.from_variant("b0", num_labels=4).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        steps = model.forward_intermediates(x, attention=True)
        for got, expected in zip(steps["stages"], model.encoder(x)):
            assert torch.equal(got, expected)
        assert torch.allclose(steps["logits"], model(x), atol=1e-6)
        assert [len(blocks) for blocks in steps["blocks"]] == list(model.config.depths)
        weights, grid = steps["attention"][1][0]  # stage 2, block 1: reduction 4 over a 12 x 16 map
        assert weights.shape == (1, 2, 12 * 16, 3 * 4) and grid == (3, 4)
        assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 12 * 16))
        fused = torch.relu(sum(steps["levels"]))  # at evaluation the BatchNorm is inside the terms
        assert torch.allclose(model.decoder.classifier(fused), steps["logits"], atol=1e-5)
