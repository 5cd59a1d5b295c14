"""train.py's settings: every setting of a run as one field of the typed `TrainConfig`, documented in one
line, and the recipes as `TrainConfig` values in one table. The machinery (checks, training_args.json, the
command line, the resolution order) is training/settings.py's."""

from dataclasses import dataclass, replace
from typing import Literal

from segformer.cli import SIZE_RANGE
from segformer.metrics import MAX_LABELS

from .settings import Command, Settings, parse_settings, setting


@dataclass(frozen=True)
class TrainConfig(Settings):
    # The run.
    recipe: Literal["default", "guide", "paper"] = setting("default", "the preset these settings started from")
    out: str = setting("runs/synthetic", "output directory of the run", may_change=True)
    seed: int = setting(0, "seed of weights, shuffling, augmentation and dropout", low=0)
    # Data: where it comes from and how labels are read.
    data: str = setting("synthetic", "'synthetic', a dataset folder, a save_to_disk dir, parquet files or a hub id")
    train_split: str = setting("train", "training split expression, e.g. 'train' or 'train[:50]'")
    eval_split: str = setting("validation", "validation split expression")
    test_size: float | None = setting(None, "hold out this fraction of the split for validation "
                                            "(the guide's train_test_split)", low=(0.0,), high=0.99)
    image_column: str = setting("image", "image column of a Hugging Face dataset")
    annotation_column: str = setting("annotation", "annotation column of a Hugging Face dataset")
    dataset_config: str | None = setting(None, "a dataset.json describing the data (default: the folder's own)")
    id2label: str | None = setting(None, "JSON file naming the classes ({\"0\": \"wall\", ...})")
    num_labels: int | None = setting(None, "number of classes (default: the data's or the checkpoint's)",
                                     low=1, high=MAX_LABELS)
    reduce_labels: bool | None = setting(None, "ADE convention: annotation 0 is 'unlabelled' (ignored) and k is "
                                               "class k-1 (default: the data source's convention)")
    allow_outside_data: bool = setting(False, "read the files that the data's own files (COCO file_name, LabelMe "
                                              "imagePath, split lists) name outside the data folder",
                                       may_change=True)
    skip_bad: bool = setting(False, "skip undecodable or invalid samples with a warning instead of stopping",
                             may_change=True)
    size: int = setting(128, "training crop / resize size and evaluation size", low=SIZE_RANGE[0], high=SIZE_RANGE[1])
    augment: Literal["guide", "paper"] = setting("guide", "training augmentation: the guide's ColorJitter or "
                                                          "the paper's rescale/crop/flip/photometric")
    eval_mode: Literal["resize", "aspect"] = setting("resize", "evaluation resize: the processor's square or "
                                                               "the paper's aspect-preserving")
    workers: int = setting(0, "DataLoader worker processes per training process", low=0, high=256,
                           may_change=True)
    # The model.
    model: str = setting("b0", "variant to build with fresh weights: b0..b5, or a config.json of your own (the "
                               "fields of SegFormerConfig or transformers' SegformerConfig: depths, widths, parts)")
    attention: str | None = setting(None, "the blocks' attention: efficient (SegFormer's), linear (PVTv2), full, "
                                          "tome (SegFormer++'s token merging), or package.module:Class of your "
                                          "own (default: the model's)")
    mlp: str | None = setting(None, "the blocks' Mix-FFN: mix_ffn, or package.module:Class (default: the model's)")
    norm: str | None = setting(None, "the norm layers: layer_norm, rms_norm, or package.module:Class (default: "
                                     "the model's)")
    activation: str | None = setting(None, "the activations: gelu, relu, silu, or package.module:Class (default: "
                                           "the model's)")
    decoder: str | None = setting(None, "the decode head: all_mlp (SegFormer's), mmseg (mmsegmentation 1.x's), or "
                                        "package.module:Class (default: the model's)")
    pretrained: str | None = setting(None, "weights to start from: a .safetensors/.pth file, a directory or "
                                           "a hub id (e.g. nvidia/mit-b0)")
    sync_bn: bool = setting(False, "SyncBatchNorm for the decode head under torchrun")
    # Optimisation.
    batch_size: int = setting(8, "images per step per process", low=1, high=65536)
    total_batch_size: int | None = setting(None, "images per step over all processes (sets --batch-size)",
                                           low=1, high=65536)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", low=1, high=65536)
    lr: float = setting(1e-3, "peak learning rate of AdamW", low=(0.0,), high=10.0)
    weight_decay: float = setting(0.01, "AdamW weight decay", low=0.0, high=10.0)
    decay_norm_bias: bool = setting(True, "weight decay on the weights and biases of norm layers")
    head_lr_mult: float = setting(1.0, "learning-rate multiplier for the decode head (the paper: 10)",
                                  low=(0.0,), high=1000.0)
    warmup_steps: int = setting(100, "linear warmup steps before the poly decay", low=0)
    poly_power: float = setting(1.0, "power of the poly decay (1 = linear)", low=0.0, high=100.0)
    clip_grad: float | None = setting(None, "clip the gradient norm to this value", low=(0.0,))
    # Fine-tuning controls (for small data and large images).
    freeze_stages: int = setting(0, "freeze the first N encoder stages (patch embedding, blocks, norm; 4: the whole "
                                    "encoder): no gradient, no optimizer state, dropout and drop path off", low=0,
                                 high=4)
    layer_decay: float | None = setting(None, "layer-wise learning-rate decay over the encoder's blocks: block i of L "
                                              "gets lr x decay^(L + 1 - i) (BEiT's fine-tuning; e.g. 0.75)",
                                        low=(0.0,), high=1.0)
    drop_path_rate: float | None = setting(None, "stochastic depth: the drop-path rate of the last block, rising "
                                                 "linearly from 0 (default: the model's, 0.1)", low=0.0, high=0.99)
    ema: float | None = setting(None, "keep an exponential moving average of the weights with this decay (e.g. "
                                      "0.999), evaluated beside them and saved in each checkpoint", low=(0.0,),
                                high=0.999999)
    ema_best: bool = setting(False, "keep best/ from the moving average's weights and evaluations")
    patience: int | None = setting(None, "early stopping: end the run when the validation mean IoU has not "
                                         "improved for N evaluations", low=1, may_change=True)
    grad_checkpointing: bool = setting(False, "recompute each block's activations in the backward instead of keeping "
                                              "them: the same gradients for less memory (B0, 1024x1024: 0.74x)",
                                       may_change=True)
    lora_rank: int | None = setting(None, "LoRA (the peft library) of this rank on the encoder's attention and "
                                          "Mix-FFN projections, the encoder otherwise frozen, the decoder trained; "
                                          "checkpoints hold the merged weights", low=1, high=1024)
    lora_alpha: float = setting(16.0, "LoRA's scale is alpha / rank", low=(0.0,))
    # Knowledge distillation.
    teacher: str | None = setting(None, "a trained model of the run's classes (a directory, a weights file or a hub "
                                        "id; any variant, e.g. a B2 teaching a B0) whose class probabilities the "
                                        "model also learns: frozen, without gradients, under the run's autocast")
    distill_weight: float = setting(1.0, "the distillation loss's weight beside the cross-entropy (--teacher)",
                                    low=(0.0,), high=1000.0)
    distill_temperature: float = setting(1.0, "the softmax temperature T of the distillation loss, T^2 KL "
                                              "(teacher || model) per pixel (--teacher)", low=(0.0,), high=100.0)
    # The loss.
    loss: Literal["ce", "dice", "ce+dice"] = setting("ce", "cross-entropy (the reference's), soft Dice, or both")
    class_weights: str | None = setting(None, "cross-entropy class weights: 'auto' (median frequency balancing "
                                              "over the training split) or a JSON file")
    class_weight_values: tuple[float, ...] | None = setting(None, "the class weights in use", flag=False)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", low=0.0, high=0.99)
    ohem: float | None = setting(None, "online hard example mining: keep pixels whose true-class probability "
                                       "is below this (mmseg's OHEMPixelSampler)", low=(0.0,), high=1.0)
    ohem_min_kept: int = setting(100_000, "OHEM keeps at least this many pixels per image", low=1)
    amp: Literal["auto", "off", "bf16", "fp16"] = setting("auto", "autocast dtype (auto: bf16 on CUDA, off on "
                                                                   "CPU; fp16 uses a GradScaler)")
    max_steps: int | None = setting(1200, "optimizer steps in total (wins over --epochs)", low=1, may_change=True)
    epochs: int | None = setting(None, "passes over the training set (given alone, clears the recipe's "
                                       "--max-steps)", low=1, may_change=True)
    # What happens between steps.
    eval_every: int = setting(300, "evaluate every N steps", low=1, may_change=True)
    save_every: int = setting(300, "write a checkpoint every N steps", low=1, may_change=True)
    save_total_limit: int | None = setting(2, "keep only the newest N checkpoint-<step> directories", low=1,
                                           may_change=True)
    log_every: int = setting(20, "log loss and lr every N steps", low=1, may_change=True)
    # What the run shows and shares.
    plots: bool = setting(True, "draw curves.png and each evaluation's confusion heatmap (matplotlib, a second or "
                                "two each); --no-plots writes the numbers only", may_change=True)
    report_to: Literal["none", "tensorboard"] = setting("none", "also log to TensorBoard (<out>/tensorboard)",
                                                        may_change=True)
    push_to_hub: str | None = setting(None, "upload best/ to this hub repository (HF_TOKEN or `hf auth login`)",
                                      may_change=True)
    hub_private: bool = setting(False, "create the hub repository private", may_change=True)
    hub_strategy: Literal["end", "every_save"] = setting("end", "push best/ at the end, or every checkpoint too",
                                                         may_change=True)
    # Where and how fast it runs: no effect on the numbers.
    device: str | None = setting(None, "cuda, cpu, cuda:1, ... (default: cuda if available)", may_change=True)
    compile: bool = setting(False, "torch.compile the model", may_change=True)
    channels_last: bool = setting(False, "channels-last memory format", may_change=True)
    fold_decoder: bool = setting(True, "run the all-MLP decoder folded (fast); --no-fold-decoder runs its paper "
                                       "form as written (segformer/decoder.py), for an edited decoder",
                                 may_change=True)

# ---- the recipes -------------------------------------------------------------------------------------

DEFAULT = TrainConfig()  # no network, no GPU: the built-in synthetic scenes, B0 from scratch, a few CPU minutes

RECIPES = {
    "default": DEFAULT,
    # The Hugging Face semantic-segmentation guide: 50 images of SceneParse150 split 80/20, nvidia/mit-b0,
    # and the Trainer's defaults it relies on.
    "guide": replace(
        DEFAULT, recipe="guide", out="runs/guide",
        data="scene_parse_150", train_split="train[:50]", eval_split="train[:50]", test_size=0.2,
        pretrained="nvidia/mit-b0", size=512,
        batch_size=2, lr=6e-5,
        weight_decay=0.0,  # Trainer: no weight decay
        warmup_steps=0,  # Trainer: lr_scheduler_type "linear" (poly with power 1), no warmup
        clip_grad=1.0,  # Trainer: max_grad_norm 1.0
        max_steps=None, epochs=50, eval_every=20, save_every=20, save_total_limit=3, log_every=1,
    ),
    # The paper on ADE20K, as NVlabs' local_configs/segformer/B0/segformer.b0.512x512.ade.160k.py sets it.
    "paper": replace(
        DEFAULT, recipe="paper", out="runs/paper",
        data="scene_parse_150", train_split="train", eval_split="validation", pretrained="nvidia/mit-b0",
        size=512,  # crop_size (512, 512)
        augment="paper",  # resize to (2048, 512) x ratio 0.5-2.0, crop with cat_max_ratio 0.75, flip, photometric
        eval_mode="aspect",  # test: keep_ratio resize to short side 512
        total_batch_size=16,  # samples_per_gpu 2 x 8 GPUs, divided over however many processes run
        lr=6e-5, weight_decay=0.01,  # AdamW(lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01)
        decay_norm_bias=False,  # paramwise_cfg custom_keys 'norm': decay_mult 0
        head_lr_mult=10.0,  # paramwise_cfg custom_keys 'head': lr_mult 10
        warmup_steps=1500, poly_power=1.0,  # lr_config: poly, power 1, min_lr 0, linear warmup 1500 iterations
        max_steps=160_000,  # runner: IterBasedRunner, max_iters 160000
        sync_bn=True,  # norm_cfg SyncBN (when several processes run)
        eval_every=16_000, save_every=16_000, save_total_limit=3, log_every=50,  # evaluation/checkpoint 16000
        workers=4,  # workers_per_gpu 4
    ),
}


def parse_command_line(argv=None, *, description: str = "") -> Command:
    """train.py's command line: TrainConfig resolved from RECIPES, the saved run and the flags, with --eval-only."""
    return parse_settings(argv, settings=TrainConfig, recipes=RECIPES, description=description, evaluation=True)
