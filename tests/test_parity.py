"""Parity with the reference implementation (transformers) on the same weights."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from segformer import SegFormer, segmentation_loss
from segformer.config import VARIANTS
from segformer.weight_layouts import native_to_hf

from helpers import hf_config, hf_segmentation_model, randomize_

ATOL = 1e-4


def reference_logits(hf_model, x):
    with torch.no_grad():
        return hf_model(pixel_values=x).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hub_layout_logits_match_every_variant(variant, tmp_path):
    reference = hf_segmentation_model(variant, num_labels=7)
    reference.save_pretrained(tmp_path)
    ours = SegFormer.from_pretrained(tmp_path).eval()
    assert ours.config.variant == variant
    # batch > 1, not square, not a multiple of 32; B0 at the size the issue names, the rest smaller
    size = (200, 328) if variant == "b0" else (72, 104)
    x = torch.randn(2, 3, *size)
    expected = reference_logits(reference, x)
    with torch.no_grad():
        got = ours(x)
    assert got.shape == expected.shape == (2, 7, (size[0] + 3) // 4, (size[1] + 3) // 4)
    assert (got - expected).abs().max().item() <= ATOL


def test_classification_layout_loads_encoder_and_says_so(tmp_path, caplog):
    from transformers import SegformerForImageClassification
    torch.manual_seed(0)
    classifier = randomize_(SegformerForImageClassification(hf_config("b0", num_labels=1000)), seed=1).eval()
    classifier.save_pretrained(tmp_path)
    ours = SegFormer.from_pretrained(tmp_path, num_labels=150).eval()
    assert "encoder only" in caplog.text and "classifier.weight" in caplog.text
    assert ours.config.num_labels == 150
    default = SegFormer.from_pretrained(tmp_path)  # the config names 1000 ImageNet classes: not ours to keep
    assert default.config.num_labels == 150 and default.id2label[0] == "LABEL_0"

    x = torch.randn(2, 3, 200, 328)
    with torch.no_grad():
        expected = classifier.segformer(x, output_hidden_states=True).hidden_states
        got = ours.encoder(x)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert (g - e).abs().max().item() <= ATOL


def hf_to_nvlabs_by_hand(state_dict):
    """The documented renaming (mmseg's mix_transformer.py and segformer_head.py names), written
    independently of segformer/weight_layouts.py: 1-based stages, k and v merged into one `kv`."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("segformer.encoder.patch_embeddings."):
            s = int(parts[3]) + 1
            sub = {"proj": "proj", "layer_norm": "norm"}[parts[4]]
            out[f"backbone.patch_embed{s}.{sub}.{parts[5]}"] = value
        elif key.startswith("segformer.encoder.block."):
            s, b, rest = int(parts[3]) + 1, parts[4], ".".join(parts[5:])
            rest = (rest.replace("layer_norm_1", "norm1").replace("layer_norm_2", "norm2")
                    .replace("attention.self.query", "attn.q").replace("attention.self.sr", "attn.sr")
                    .replace("attention.self.layer_norm", "attn.norm").replace("attention.output.dense", "attn.proj")
                    .replace("mlp.dense1", "mlp.fc1").replace("mlp.dense2", "mlp.fc2"))
            if "attention.self.key" in rest:
                leaf = parts[-1]
                value_key = key.replace("attention.self.key", "attention.self.value")
                out[f"backbone.block{s}.{b}.attn.kv.{leaf}"] = torch.cat([value, state_dict[value_key]])
            elif "attention.self.value" not in rest:
                out[f"backbone.block{s}.{b}.{rest}"] = value
        elif key.startswith("segformer.encoder.layer_norm."):
            out[f"backbone.norm{int(parts[3]) + 1}.{parts[4]}"] = value
        elif key.startswith("decode_head.linear_c."):
            out[f"decode_head.linear_c{int(parts[2]) + 1}.proj.{parts[4]}"] = value
        elif key.startswith("decode_head.linear_fuse."):
            out[f"decode_head.linear_fuse.conv.{parts[2]}"] = value
        elif key.startswith("decode_head.batch_norm."):
            out[f"decode_head.linear_fuse.bn.{parts[2]}"] = value
        elif key.startswith("decode_head.classifier."):
            out[f"decode_head.linear_pred.{parts[2]}"] = value
        else:
            raise AssertionError(key)
    return out


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_nvlabs_layout_logits_match(fmt, tmp_path, hf_b0_dir):
    from transformers import SegformerForSemanticSegmentation
    reference = SegformerForSemanticSegmentation.from_pretrained(hf_b0_dir).eval()
    nvlabs = hf_to_nvlabs_by_hand(load_file(hf_b0_dir / "model.safetensors"))
    nvlabs["decode_head.conv_seg.weight"] = torch.randn(7, 256, 1, 1)  # mmseg's unused head
    nvlabs["decode_head.conv_seg.bias"] = torch.randn(7)
    if fmt == "pth":
        path = tmp_path / "segformer.b0.512x512.ade.160k.pth"
        torch.save({"meta": {"CLASSES": ["a"] * 7}, "state_dict": nvlabs}, path)
    else:
        path = tmp_path / "weights.safetensors"
        save_file(nvlabs, path)
    ours = SegFormer.from_pretrained(path).eval()
    assert ours.config.variant == "b0" and ours.config.num_labels == 7
    x = torch.randn(2, 3, 200, 328)
    with torch.no_grad():
        assert (ours(x) - reference_logits(reference, x)).abs().max().item() <= ATOL


def test_our_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import SegformerForSemanticSegmentation
    names = {i: f"class {i}" for i in range(5)}
    ours = randomize_(SegFormer.from_variant("b1", num_labels=5, id2label=names), seed=3).eval()
    ours.save_pretrained(tmp_path)
    reference = SegformerForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reference.config.id2label == names
    x = torch.randn(2, 3, 136, 200)
    with torch.no_grad():
        assert (ours(x) - reference_logits(reference, x)).abs().max().item() <= ATOL


def test_train_mode_loss_and_gradients_match(hf_b0_dir, tmp_path):
    from transformers import SegformerForSemanticSegmentation
    reference = SegformerForSemanticSegmentation.from_pretrained(
        hf_b0_dir, drop_path_rate=0.0, classifier_dropout_prob=0.0).train()
    ours = SegFormer.from_pretrained(hf_b0_dir, drop_path_rate=0.0, classifier_dropout=0.0).train()

    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 136)
    labels = torch.randint(0, 7, (2, 96, 136))
    labels[:, :10] = 255  # ignored pixels
    expected = reference(pixel_values=x, labels=labels).loss
    expected.backward()
    got = segmentation_loss(ours(x), labels)
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)

    # Name the reference's gradients in the hub layout the way transformers itself does: save a copy
    # of the model whose parameters hold the gradients.
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.grad)
    reference.save_pretrained(tmp_path)
    reference_grads = load_file(tmp_path / "model.safetensors")
    our_grads = native_to_hf({name: p.grad for name, p in ours.named_parameters()})
    assert all(g is not None for g in our_grads.values())
    assert set(our_grads) == {k for k in reference_grads if not k.startswith("decode_head.batch_norm.running")
                              and not k.endswith("num_batches_tracked")}
    for name, grad in our_grads.items():
        assert torch.allclose(grad, reference_grads[name], rtol=1e-3, atol=1e-5), name


def test_single_label_loss_matches_the_reference(tmp_path):
    """With one label the reference switches to a per-pixel sigmoid; ours follows."""
    from transformers import SegformerForSemanticSegmentation
    hf_segmentation_model("b0", num_labels=1, drop_path_rate=0.0, classifier_dropout_prob=0.0).save_pretrained(tmp_path)
    reference = SegformerForSemanticSegmentation.from_pretrained(tmp_path).train()
    ours = SegFormer.from_pretrained(tmp_path, drop_path_rate=0.0, classifier_dropout=0.0).train()
    x = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 2, (2, 64, 96))
    labels[:, :5] = 255
    expected = reference(pixel_values=x, labels=labels).loss
    assert torch.allclose(segmentation_loss(ours(x), labels), expected, rtol=1e-4, atol=1e-6)


def test_the_image_classifier_is_transformers_segformer_for_image_classification(tmp_path, caplog):
    """Pre-training's model: same logits as transformers' on shared random weights, saved in the hub's
    encoder layout that transformers and SegFormer.from_pretrained (as an encoder) both load."""
    from transformers import SegformerForImageClassification

    from segformer.classification import ImageClassifier
    torch.manual_seed(0)
    reference = randomize_(SegformerForImageClassification(hf_config("b0", num_labels=10)), seed=2).eval()
    reference.save_pretrained(tmp_path / "reference")
    ours = ImageClassifier.from_pretrained(tmp_path / "reference").eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        assert (ours(x) - reference(x).logits).abs().max().item() <= ATOL
    ours.save_pretrained(tmp_path / "ours")
    again = SegformerForImageClassification.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(x).logits - reference(x).logits).abs().max().item() <= ATOL
    segmenter = SegFormer.from_pretrained(tmp_path / "ours", num_labels=5)
    assert "its 192 encoder tensors are loaded" in caplog.text and "classifier.weight" in caplog.text
    assert all(torch.equal(value, segmenter.state_dict()[key]) for key, value in ours.state_dict().items()
               if key.startswith("encoder."))


# ---- other libraries' layouts: segmentation_models_pytorch (installed: the real thing), mmsegmentation 1.x --

def smp_reference(classes=5, seed=0):
    smp = pytest.importorskip("segmentation_models_pytorch")
    return randomize_(smp.Segformer("mit_b0", encoder_weights=None, classes=classes), seed=seed).eval()


def test_smp_weights_load_with_smp_logits_and_convert_back(tmp_path, capsys):
    import convert
    reference = smp_reference()
    reference.save_pretrained(tmp_path / "smp")  # model.safetensors + smp's own config.json
    ours = SegFormer.from_pretrained(tmp_path / "smp").eval()
    assert ours.config.variant == "b0" and ours.config.num_labels == 5
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():  # smp upsamples the 1/4-resolution logits x4 itself, corners aligned
        upsampled = torch.nn.functional.interpolate(ours(x), scale_factor=4, mode="bilinear", align_corners=True)
        assert (upsampled - reference(x)).abs().max().item() <= ATOL
    assert convert.main([str(tmp_path / "smp"), "--to", "smp", "--out", str(tmp_path / "back")]) == 0
    again = type(reference).from_pretrained(tmp_path / "back")  # smp reads what we wrote
    original = reference.state_dict()
    assert again.state_dict().keys() == original.keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in original.items())


def mit2mmseg_by_hand(backbone: dict) -> dict:
    """mmsegmentation's tools/model_converters/mit2mmseg.py, written out independently of
    segformer/weight_layouts.py: an NVlabs ImageNet MiT (patch_embed1..., block1..., norm1..., head) -> mmseg 1.x."""
    out = {}
    for key, value in backbone.items():
        if key.startswith("head"):
            continue
        stage = int(re.match(r"(patch_embed|block|norm)(\d+)\.", key).group(2)) - 1
        if key.startswith("patch_embed"):
            out[key.replace(f"patch_embed{stage + 1}", f"layers.{stage}.0").replace("proj.", "projection.")] = value
        elif key.startswith("block"):
            new = key.replace(f"block{stage + 1}", f"layers.{stage}.1")
            if "attn.q." in new:
                out[new.replace("q.", "attn.in_proj_")] = torch.cat([value, backbone[key.replace("q.", "kv.")]])
            elif "attn.kv." in new:
                continue
            elif "attn.proj." in new:
                out[new.replace("proj.", "attn.out_proj.")] = value
            elif "mlp." in new:
                if "fc1.weight" in new or "fc2.weight" in new:
                    value = value.reshape(*value.shape, 1, 1)
                new = new.replace("mlp.", "ffn.layers.").replace("fc1.", "0.").replace("dwconv.dwconv.", "1.")
                out[new.replace("fc2.", "4.")] = value
            else:
                out[new] = value
        elif key.startswith("norm"):
            out[key.replace(f"norm{stage + 1}", f"layers.{stage}.2")] = value
    return out


def test_an_mmseg_backbone_from_the_published_conversion_loads_as_the_nvlabs_file(tmp_path, hf_b0_dir):
    full = hf_to_nvlabs_by_hand(load_file(hf_b0_dir / "model.safetensors"))
    nvlabs = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
    nvlabs.update({"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)})  # mit_b0.pth's ImageNet head
    torch.save(nvlabs, tmp_path / "mit_b0.pth")
    mmseg = mit2mmseg_by_hand(nvlabs)
    assert "layers.0.1.0.attn.attn.in_proj_weight" in mmseg and "layers.3.2.weight" in mmseg
    torch.save({"meta": {}, "state_dict": mmseg}, tmp_path / "mit_b0_mmseg.pth")
    from_nvlabs = SegFormer.from_pretrained(tmp_path / "mit_b0.pth", num_labels=3).eval()
    from_mmseg = SegFormer.from_pretrained(tmp_path / "mit_b0_mmseg.pth", num_labels=3).eval()
    encoder = {k: v for k, v in from_nvlabs.state_dict().items() if k.startswith("encoder.")}
    assert len(encoder) == 192 and all(torch.equal(from_mmseg.state_dict()[k], v) for k, v in encoder.items())
    from_mmseg.decoder.load_state_dict(from_nvlabs.decoder.state_dict())  # the heads are new: the same one for both
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(from_mmseg(x), from_nvlabs(x))


def test_an_mmseg_segmentor_with_its_head_converts_both_ways(tmp_path):
    import convert
    model = randomize_(SegFormer.from_variant("b0", num_labels=4, decoder="mmseg")).eval()
    model.save_pretrained(tmp_path / "ours")
    assert convert.main([str(tmp_path / "ours"), "--to", "mmseg", "--out", str(tmp_path / "mmseg.pth")]) == 0
    written = torch.load(tmp_path / "mmseg.pth", weights_only=True)
    weights = written["state_dict"]
    assert weights["backbone.layers.0.1.0.attn.attn.in_proj_weight"].shape == (96, 32)  # q, k, v in one
    assert weights["backbone.layers.0.1.0.ffn.layers.0.weight"].shape == (128, 32, 1, 1)  # a 1x1 conv
    assert weights["decode_head.conv_seg.weight"].shape == (4, 256, 1, 1)  # mmseg 1.x's classifier
    assert written["meta"]["dataset_meta"]["classes"] == ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]
    back = SegFormer.from_pretrained(tmp_path / "mmseg.pth").eval()
    assert back.config.decoder == "mmseg" and back.config.num_labels == 4
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    stock = tmp_path / "stock"
    SegFormer.from_variant("b0", num_labels=4).save_pretrained(stock)
    assert convert.main([str(stock), "--to", "mmseg", "--out", str(tmp_path / "x.pth")]) == 2  # all-MLP: no place
    assert convert.main([str(stock), "--to", "mmseg", "--encoder-only", "--out", str(tmp_path / "x.pth")]) == 0
