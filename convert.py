"""Write a SegFormer checkpoint in another library's layout, for use there.

    python convert.py runs/synthetic/best --to smp --out for_smp/            # segmentation_models_pytorch
    python convert.py runs/synthetic/best --to mmseg --out segformer.pth     # mmsegmentation 1.x (decoder mmseg)
    python convert.py segformer.b0.512x512.ade.160k.pth --to hf --out b0/    # transformers (the hub layout)

Every layout reads without conversion: `SegFormer.from_pretrained` (and every script's --checkpoint or
--pretrained) takes the hub's, NVlabs', mmsegmentation 1.x's and segmentation_models_pytorch's weights as
they are (segformer/weight_layouts.py). This is the other way:

  hf     model.safetensors + config.json: transformers' SegformerForSemanticSegmentation.from_pretrained(out)
  smp    model.safetensors + smp's config.json: segmentation_models_pytorch.Segformer.from_pretrained(out),
         or smp.Segformer("mit_b0", classes=K).load_state_dict(safetensors.torch.load_file(...)); smp's
         forward upsamples the logits x4 (align_corners=True) where ours returns them at 1/4
  mmseg  a .pth with {"meta": {"dataset_meta": {"classes", "palette"}}, "state_dict"}, mmseg 1.x's
         checkpoint format: `backbone.layers.*` (as its mit2mmseg converter writes MiT) and, for a model
         with mmseg's head (decoder "mmseg"), `decode_head.*`; a model with the all-MLP decoder has no
         place in mmseg 1.x's SegformerHead: --encoder-only writes its backbone alone

The weights are checked after writing: read back through our own loader, they give the same logits.
"""

import argparse
import sys
from pathlib import Path

import torch

from segformer import SegFormer
from segformer.weight_layouts import WEIGHT_LAYOUTS
from segformer.checkpoint import describe
from segformer.files import writable_folder, write_json, write_safetensors, write_torch
from segformer.cli import run_main
from segformer.errors import CheckpointError, ConfigError

TARGETS = ("hf", "smp", "mmseg")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, weights file or hub id (any layout)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the layout to write")
    p.add_argument("--out", required=True, help="output folder (hf, smp) or .pth file (mmseg)")
    p.add_argument("--encoder-only", action="store_true", help="write the encoder alone (mmseg: the backbone)")
    p.add_argument("--trust-code", action="store_true",
                   help="import the code from outside this project that the checkpoint names as a part of its model")
    return p.parse_args(argv)


def smp_config(model: SegFormer) -> dict:
    """segmentation_models_pytorch's config.json for its hub mixin (`Segformer.from_pretrained`)."""
    variant = model.config.variant
    if variant is None or model.config.parts:
        raise ConfigError(f"segmentation_models_pytorch builds MiT-B0..B5 with the stock parts only, not "
                          f"{model.config.describe()}")
    return {"_model_class": "Segformer", "encoder_name": f"mit_{variant}", "encoder_depth": 5,
            "encoder_weights": None, "decoder_segmentation_channels": model.config.decoder_hidden_size,
            "in_channels": model.config.in_channels, "classes": model.config.num_labels, "activation": None,
            "upsampling": 4, "aux_params": None}


def convert(checkpoint: str, to: str, out: Path, *, encoder_only: bool = False, trust_code: bool = False) -> Path:
    """Everything main does; returns what it wrote. A problem is a UserError naming it."""
    if to != "mmseg" and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file; --to {to} writes a folder")
    writable_folder(out.parent if to == "mmseg" else out)  # before any work: a read-only or full disk is one line
    facts = describe(checkpoint)
    model = SegFormer.from_pretrained(facts, trust_code=trust_code).eval()
    native = model.state_dict()
    if encoder_only:
        native = {k: v for k, v in native.items() if k.startswith("encoder.")}
    if to == "mmseg":
        if out.suffix not in (".pth", ".pt"):
            raise ConfigError(f"--out {out}: mmsegmentation reads a .pth file")
        weights = WEIGHT_LAYOUTS["mmseg"].from_native(native)
        meta = {"dataset_meta": {"classes": list(model.config.label_names()),
                                 "palette": [list(c) for c in facts.palette] if facts.palette else None}}
        write_torch({"meta": meta, "state_dict": weights}, out)
        written = out
    else:
        if to == "hf":
            if model.config.parts:
                raise ConfigError(f"transformers builds the stock SegFormer only, not {model.config.describe()}")
            weights = WEIGHT_LAYOUTS["hf"].from_native(native)
            write_json(model.config.to_hf_dict(), out / "config.json")
        else:
            weights = WEIGHT_LAYOUTS["smp"].from_native(native)
            write_json(smp_config(model), out / "config.json")
        write_safetensors(weights, out / "model.safetensors")
        written = out
    check(model, written, encoder_only=encoder_only)
    print(f"wrote {model.config.describe()} ({len(weights)} tensors) in the {WEIGHT_LAYOUTS[to].name} layout: {written}")
    return written


def check(model: SegFormer, written: Path, *, encoder_only: bool) -> None:
    """Read the written weights back through our loader: the same encoder features (and logits)."""
    reread = SegFormer.from_pretrained(written, num_labels=model.config.num_labels).eval()
    x = torch.randn(1, model.config.in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if encoder_only:
            same = all(torch.equal(a, b) for a, b in zip(model.encoder(x), reread.encoder(x)))
        else:
            same = torch.equal(model(x), reread(x))
    if not same:
        raise CheckpointError(f"{written}: read back, the weights do not give the model's numbers")


def main(argv=None) -> int:
    args = get_args(argv)
    return run_main(lambda: convert(args.checkpoint, args.to, Path(args.out), encoder_only=args.encoder_only,
                                    trust_code=args.trust_code))


if __name__ == "__main__":
    sys.exit(main())
