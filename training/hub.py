"""Sharing a run: the model card every checkpoint carries, and pushing to the Hugging Face hub.

The card is the hub's README.md: YAML front matter (license, tags, datasets, base model, the metrics as
a model-index, built with huggingface_hub's ModelCardData) then the results, the per-class table, the
training settings, and how to load the model with this project and with transformers.

--push-to-hub REPO_ID uploads `best/` at the end (--hub-strategy end) and also every checkpoint as it is
written (every_save), with huggingface_hub (`create_repo`, `upload_folder`): HF_TOKEN, `hf auth login`
and HF_HUB_OFFLINE apply. A missing token or an offline hub is one line at the start; an upload that
fails later is reported and training goes on (the files are on disk, and the command to push them is said).
"""

import math
from pathlib import Path

from segformer.parts import is_own_code
from segformer.errors import UserError
from segformer.metrics import metrics_where

PROJECT = "segformer-pytorch-pure"
SETTINGS = ("data", "train_split", "eval_split", "size", "augment", "model", "pretrained", "batch_size",
            "total_batch_size", "grad_accum", "lr", "weight_decay", "decay_norm_bias", "head_lr_mult", "warmup_steps",
            "poly_power", "clip_grad", "max_steps", "epochs", "amp", "loss", "class_weights", "label_smoothing",
            "ohem", "seed")


class HubError(UserError):
    """The hub cannot be used as asked; the message says why and what to do."""


def eval_results(dataset: str, split: str, metrics: dict, shown) -> list:
    """The model-index entries of a card (the results the hub shows, huggingface_hub's EvalResult) for the
    metrics of `shown` (rows of segformer.metrics.METRICS) that were measured."""
    from huggingface_hub import EvalResult
    return [EvalResult(task_type="semantic-segmentation", task_name="Semantic Segmentation", dataset_type=dataset,
                       dataset_name=dataset, dataset_split=split, metric_type=m.key, metric_name=m.name,
                       metric_value=round(float(metrics[m.key]), 4))
            for m in shown if metrics.get(m.key) is not None]


def model_card(config, class_names: list[str], metrics: dict, *, step: int, variant: str | None,
               dataset_name: str | None = None, parts: dict | None = None) -> str:
    """The README.md of a checkpoint: front matter for the hub, then the results and how to use it. `parts`:
    the model's parts that are not SegFormer's (segformer/parts.py), which transformers cannot build."""
    from huggingface_hub import ModelCardData
    title = f"SegFormer-{variant.upper()}" if variant else "SegFormer"
    dataset = dataset_name or config.data
    on_hub = "/" in str(config.pretrained or "") and not Path(str(config.pretrained)).exists()
    results = eval_results(dataset, config.eval_split, metrics or {}, metrics_where(card="every"))
    data = ModelCardData(
        license="other" if on_hub and str(config.pretrained).startswith("nvidia/") else "mit",
        library_name=PROJECT if parts else "transformers", pipeline_tag="image-segmentation",
        tags=["segformer", "semantic-segmentation", "vision", PROJECT],
        datasets=[dataset] if "/" in dataset or dataset == "scene_parse_150" else None,
        base_model=str(config.pretrained) if on_hub else None,
        model_name=f"{title} on {dataset}", eval_results=results or None)
    loads = ("It loads with this project and with `transformers` alike." if not parts else
             "Its parts " + ", ".join(f"{part} `{name}`" for part, name in parts.items()) + " are not SegFormer's: "
             "it loads with this project (`SegFormer.from_pretrained`), not with `transformers`.")
    lines = ["---", data.to_yaml(), "---", "", f"# {title} on {dataset}", "",
             f"SegFormer (Xie et al., 2021) trained with {PROJECT} "
             f"({'from ' + str(config.pretrained) if config.pretrained else 'from scratch'}), {step} steps. "
             + loads, ""]
    if metrics:
        where = f"{config.eval_split}, {config.eval_mode} evaluation at {config.size}"
        lines += [f"## Results at step {step} ({where})", "",
                  f"mean IoU **{metrics['mean_iou']:.4f}**, mean accuracy {metrics['mean_accuracy']:.4f}, overall "
                  f"accuracy {metrics['overall_accuracy']:.4f}", "", "| class | IoU | accuracy |", "|---|---|---|"]
        for name, iou, accuracy in zip(class_names, metrics["per_category_iou"], metrics["per_category_accuracy"]):
            if iou is not None and not math.isnan(float(iou)):
                lines.append(f"| {name.strip()} | {float(iou):.4f} | {_fmt(accuracy)} |")
        lines.append("")
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {getattr(config, name)} |" for name in SETTINGS if getattr(config, name) is not None]
    lines += ["", "The complete settings are in `training_args.json`.", "", "## How to use", "",
              f"With {PROJECT} (no transformers needed):", "", "```python",
              "from segformer import SegFormer",
              "from segformer.images import load_image",
              "from segformer.inference import Predictor",
              'model = SegFormer.from_pretrained("REPO_OR_FOLDER"'
              + (", trust_code=True)" if not all(map(is_own_code, (parts or {}).values())) else ")"),
              f"result = Predictor(model, size={config.size})(load_image(\"photo.jpg\"))",
              "result.label_map  # (H, W) class ids", "```", ""]
    if not parts:
        lines += ["With transformers:", "", "```python",
                  "from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor",
                  'model = SegformerForSemanticSegmentation.from_pretrained("REPO_OR_FOLDER")',
                  'processor = SegformerImageProcessor.from_pretrained("REPO_OR_FOLDER")', "```", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None or math.isnan(float(value)) else f"{float(value):.4f}"


class HubPusher:
    """Uploads run folders to one hub repository. Constructed at the start of a run: no token, or the hub
    unreachable, is an error then (HubError, one line); later failures are returned, never raised."""

    IGNORE = ["training_state.pt", ".*"]  # the optimizer's state stays on disk: the model, card and settings go

    def __init__(self, repo_id: str, *, private: bool = False):
        from huggingface_hub import HfApi, constants
        from huggingface_hub.utils import get_token
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"--push-to-hub {repo_id}: the hub is in offline mode (HF_HUB_OFFLINE=1); unset it, or "
                           f"push later with `hf upload {repo_id} <run>/best`")
        if not get_token():
            raise HubError(f"--push-to-hub {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
        self.api, self.repo_id = HfApi(), repo_id
        try:
            self.url = self.api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        except Exception as e:  # no network, no permission, a bad name
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise HubError(f"--push-to-hub {repo_id}: cannot create or reach the repository "
                           f"({type(e).__name__}: {reason})") from None
        self.failures = []

    def push(self, folder: Path, message: str) -> bool:
        try:
            self.api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), commit_message=message,
                                   ignore_patterns=self.IGNORE)
            return True
        except Exception as e:  # the run goes on: its files are on disk
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failures.append(f"{folder}: {type(e).__name__}: {first_line}")
            print(f"warning: pushing {folder} to {self.repo_id} failed ({type(e).__name__}: {first_line}); "
                  f"training goes on; push it later with `hf upload {self.repo_id} {folder}`")
            return False
