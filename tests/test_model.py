"""Cheap checks of the model itself and of loading/saving: shapes, gradients, round trips, errors."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from segformer import SegFormer, SegFormerConfig
from segformer.errors import CheckpointError
from segformer.weight_layouts import WeightLayoutError

from helpers import randomize_


@pytest.fixture()
def b0():  # each test its own: some randomise, train or backpropagate through it
    torch.manual_seed(0)
    return SegFormer.from_variant("b0", num_labels=5)


@pytest.mark.parametrize("size", [(64, 64), (33, 47), (97, 130), (128, 72)])
def test_odd_sizes_give_quarter_resolution_logits(b0, size):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        features = b0.eval().encoder(x)
        logits = b0(x)
    H, W = size
    assert logits.shape == (1, 5, -(-H // 4), -(-W // 4))
    assert b0.encoder.channels == [32, 64, 160, 256] and b0.encoder.reduction == [4, 8, 16, 32]
    for f, channels, step in zip(features, b0.encoder.channels, (4, 2, 2, 2)):
        H, W = -(-H // step), -(-W // step)  # each patch embedding rounds up: ceil(H / stride)
        assert f.shape == (1, channels, H, W)


def test_every_parameter_gets_a_gradient_and_no_nans(b0):
    b0.train()
    x = torch.randn(2, 3, 64, 96)
    logits = b0(x)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    missing = [n for n, p in b0.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert missing == []
    b0.zero_grad(set_to_none=True)


@pytest.mark.parametrize("training", [True, False])
def test_the_folded_decoder_computes_the_paper_form(b0, training):
    """The folded form (per-level maps with the BatchNorm inside at evaluation, upsampling as one matrix
    product) against the paper's four steps, with random running statistics: logits, loss and gradients."""
    from segformer import segmentation_loss
    randomize_(b0, seed=5).train(training)
    b0.decoder.dropout.eval()  # the same function; dropout's mask follows the memory layout
    features = [f.detach() for f in b0.encoder(torch.randn(2, 3, 100, 140))]
    labels = torch.randint(0, 5, (2, 100, 140))
    results = []
    for form in (b0.decoder.forward_paper, b0.decoder.forward_folded):
        b0.zero_grad()
        logits = form(features)
        loss = segmentation_loss(logits, labels)
        loss.backward()
        results.append((logits.detach(), loss.detach(), [p.grad.clone() for p in b0.decoder.parameters()]))
    (paper_logits, paper_loss, paper_grads), (folded_logits, folded_loss, folded_grads) = results
    assert torch.allclose(paper_logits, folded_logits, atol=1e-5) and torch.allclose(paper_loss, folded_loss)
    for a, b in zip(paper_grads, folded_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_an_edit_to_the_paper_form_is_never_silently_ignored(monkeypatch):
    """The paper's form is the one to edit: unfolded it runs as edited; folded, the build refuses, saying so."""
    from segformer.decoder import AllMLPDecoder
    paper = AllMLPDecoder.forward_paper
    monkeypatch.setattr(AllMLPDecoder, "forward_paper", lambda self, features: paper(self, features) * 2)
    with pytest.raises(RuntimeError, match=r"forward_paper no longer computes what forward_folded does.*"
                                           r"fold_decoder=False \(train\.py --no-fold-decoder\)"):
        SegFormer.from_variant("b0", num_labels=5)
    torch.manual_seed(0)
    edited = SegFormer.from_variant("b0", num_labels=5, fold_decoder=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(edited(x), 2 * paper(edited.decoder, edited.encoder(x)))


@pytest.mark.parametrize("in_size, out_size", [(16, 128), (13, 25), (7, 300), (128, 128), (1, 9)])
def test_bilinear_matrix_is_f_interpolate(in_size, out_size):
    from segformer.decoder import bilinear_matrix
    x = torch.randn(3, in_size, 5)
    expected = torch.nn.functional.interpolate(x[None], size=(out_size, 5), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(bilinear_matrix(out_size, in_size, x) @ x, expected, atol=1e-6)


def test_eval_is_deterministic_and_train_is_stochastic(b0):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(b0.eval()(x), b0(x))
        assert not torch.equal(b0.train()(x), b0(x))  # drop path and dropout are on


def test_variant_table_builds_each_model():
    sizes = {name: sum(p.numel() for p in SegFormer.from_variant(name).parameters()) / 1e6
             for name in ("b0", "b1", "b2")}
    # the paper's Table 6 reports 3.8M, 13.7M, 27.5M parameters (ADE20K head)
    assert sizes["b0"] == pytest.approx(3.8, abs=0.1)
    assert sizes["b1"] == pytest.approx(13.7, abs=0.1)
    assert sizes["b2"] == pytest.approx(27.5, abs=0.2)
    with pytest.raises(ValueError, match="unknown variant 'b9'"):
        SegFormer.from_variant("b9")


def test_save_and_load_round_trip(tmp_path):
    names = {0: "sky", 1: "road", 2: "car"}
    model = randomize_(SegFormer.from_variant("b0", num_labels=3, id2label=names), seed=1).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = SegFormer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    # and without config.json: the settings are read off the shapes
    loaded = SegFormer.from_pretrained(tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "config.json").unlink()
    loaded2 = SegFormer.from_pretrained(tmp_path / "ckpt")
    for m in (loaded, loaded2):
        assert m.config.variant == "b0" and m.config.num_labels == 3


def test_variant_inferred_from_weights_alone(tmp_path):
    model = SegFormer.from_variant("b2", num_labels=4)
    save_file(model.state_dict(), tmp_path / "b2.safetensors")
    assert SegFormer.from_pretrained(tmp_path / "b2.safetensors").config.variant == "b2"


def test_other_num_labels_reinitialises_the_classifier(hf_b0_dir, caplog):
    model = SegFormer.from_pretrained(hf_b0_dir, num_labels=3)
    assert "re-initialised for 3 labels (the checkpoint's has 7)" in caplog.text
    assert model.decoder.classifier.weight.shape == (3, 256, 1, 1)
    reference = load_file(hf_b0_dir / "model.safetensors")
    assert torch.equal(model.decoder.fuse.weight, reference["decode_head.linear_fuse.weight"])
    named = SegFormer.from_pretrained(hf_b0_dir, id2label={0: "a", 1: "b"})
    assert named.config.num_labels == 2 and named.id2label == {0: "a", 1: "b"}


def test_hub_repo_id_from_the_offline_cache(hf_b0_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    snapshot = tmp_path / "models--acme--segformer-test" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((hf_b0_dir / name).read_bytes())
    (tmp_path / "models--acme--segformer-test" / "refs").mkdir()
    (tmp_path / "models--acme--segformer-test" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = SegFormer.from_pretrained("acme/segformer-test")
    assert model.config.num_labels == 7
    with pytest.raises(CheckpointError, match="acme/not-cached: not in the local hub cache"):
        SegFormer.from_pretrained("acme/not-cached")


def _saved(hf_b0_dir):
    return load_file(hf_b0_dir / "model.safetensors")


def test_missing_unexpected_and_misshaped_keys_are_named(hf_b0_dir, tmp_path):
    weights = _saved(hf_b0_dir)
    del weights["segformer.encoder.block.1.0.mlp.dense1.bias"]
    save_file(weights, tmp_path / "missing.safetensors")
    with pytest.raises(WeightLayoutError, match=r"1 missing: encoder\.stages\.1\.blocks\.0\.ffn\.fc1\.bias"):
        SegFormer.from_pretrained(tmp_path / "missing.safetensors")

    weights = _saved(hf_b0_dir)
    weights["segformer.encoder.block.0.0.attention.self.query.weight"] = torch.zeros(32, 16)
    save_file(weights, tmp_path / "shape.safetensors")
    expected = r"encoder\.stages\.0\.blocks\.0\.attn\.q\.weight: checkpoint \(32, 16\) vs model \(32, 32\)"
    with pytest.raises(WeightLayoutError, match=expected):
        SegFormer.from_pretrained(tmp_path / "shape.safetensors")

    weights = _saved(hf_b0_dir)
    weights["segformer.encoder.block.0.0.attention.self.extra.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "extra.safetensors")
    with pytest.raises(WeightLayoutError, match=r"block\.0\.0\.attention\.self\.extra\.weight"):
        SegFormer.from_pretrained(tmp_path / "extra.safetensors")

    save_file({"bert.embeddings.weight": torch.zeros(1)}, tmp_path / "bert.safetensors")
    with pytest.raises(WeightLayoutError, match=r"bert\.safetensors: not a SegFormer checkpoint.*bert\.embeddings\.weight"):
        SegFormer.from_pretrained(tmp_path / "bert.safetensors")


def test_truncated_and_foreign_files_name_the_file(hf_b0_dir, tmp_path):
    data = (hf_b0_dir / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a valid safetensors file, or truncated"):
        SegFormer.from_pretrained(tmp_path / "cut.safetensors")
    (tmp_path / "notes.safetensors").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: not a valid safetensors file"):
        SegFormer.from_pretrained(tmp_path / "notes.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"junk\.pth: cannot read as a torch checkpoint"):
        SegFormer.from_pretrained(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match=r"nowhere: no such file or directory"):
        SegFormer.from_pretrained("./nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: directory holds none of model\.safetensors"):
        SegFormer.from_pretrained(tmp_path / "empty")


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = SegFormer.from_variant("b0", num_labels=2)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import segformer.files as checkpoint

    def failing_write(path, data):
        open(path, "wb").write(data[:10])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "_write_all", failing_write)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp left


def test_config_validation():
    with pytest.raises(ValueError, match="hidden size 30 is not divisible by its 4 attention heads"):
        SegFormerConfig(hidden_sizes=(30, 64, 160, 256), num_heads=(4, 2, 5, 8))
    with pytest.raises(ValueError, match="depths has 3 entries"):
        SegFormerConfig(depths=(2, 2, 2))


def test_importing_the_library_does_not_import_transformers():
    code = "import sys, segformer, segformer.metrics, segformer.inference, data; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_directory_with_only_pytorch_model_bin(hf_b0_dir, tmp_path):
    torch.save(load_file(hf_b0_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_b0_dir / "config.json").read_text())
    model = SegFormer.from_pretrained(tmp_path)
    assert model.config.num_labels == 7


def test_a_full_checkpoint_without_its_classifier_is_an_error(hf_b0_dir, tmp_path):
    weights = _saved(hf_b0_dir)
    del weights["decode_head.classifier.weight"], weights["decode_head.classifier.bias"]
    save_file(weights, tmp_path / "headless.safetensors")
    with pytest.raises(WeightLayoutError, match=r"2 missing: decoder\.classifier\.weight, decoder\.classifier\.bias"):
        SegFormer.from_pretrained(tmp_path / "headless.safetensors", num_labels=150)
