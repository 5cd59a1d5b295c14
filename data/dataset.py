"""The PyTorch `Dataset` and `DataLoader`: decoding checks, label mapping, transforms, seeding, and the
one batch format.

Every sample is checked before it reaches a model: the image decodes, the annotation is a single
channel label map of the image's size, and after the label mapping every label is a class id or 255
(with a single class, the reference's binary head: 0 or 1). A bad sample raises a `DataError` naming it,
in the main process, as one line: a worker hands the message on in the batch (`batch["errors"]`) and
the loader raises it, instead of PyTorch's re-raise with the worker's traceback. With `skip_bad=True` it
is skipped with a warning instead: `batch["skipped"]` names the samples, `batch["skip_reasons"]` says why
(from workers too), so that a bad file read again is still one bad file.

The batch format: workers hand on bytes, `pixel_values` uint8 (B, 3, H, W) and `labels` as stored (uint8,
or int64 past 255), plus `valid` (B, 2), each sample's own (h, w) where a crop smaller than the batch was
padded. The consumer makes the model's input where the model runs: `batch_to_device` normalises there
(4x less to move than floats) and zeroes the padding (the mean colour).

Augmentation is repeatable: sample `i` of epoch `e` is transformed under a torch generator seeded
from (seed, e, i), whatever the number of workers or processes. The sampler hands the epoch to the
workers along with each index, so this also holds with persistent workers.
"""

import atexit
import signal
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info

from segformer.errors import DataError
from segformer.bands import fill_nonfinite, to_band_tensor
from segformer.images import to_tensor

from .mapping import IDENTITY, IGNORE_INDEX, LabelMapping
from .transforms import normalize_batch

ANNOTATION_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")


def annotation_to_tensor(annotation: Image.Image, name: str, mapping: LabelMapping = IDENTITY) -> torch.Tensor:
    """An annotation -> (H, W) raw values: the values as stored for single-channel label maps (L, P
    indices, I;16: uint8 for 8-bit maps, int64 for 16-bit ones); for colour masks, each colour's position
    in the mapping's palette. An RGB file whose three channels are equal is a grey label map. Errors name
    the annotation's own file where it has one."""
    name = getattr(annotation, "filename", "") or name
    if mapping.palette is not None:  # colour masks: whatever the file's mode, its colours count
        return mapping.decode_colours(annotation, name)
    if annotation.mode in ("RGB", "RGBA"):
        rgb = np.asarray(annotation.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return torch.from_numpy(rgb[..., 0].copy())
        raise DataError(f"{name}: a colour mask (mode {annotation.mode}); give the data a dataset.json with "
                        f'"annotation_format": "rgb" and a "palette" of one colour per class')
    if annotation.mode not in ANNOTATION_MODES:
        raise DataError(f"{name}: annotation has mode {annotation.mode!r} ({len(annotation.getbands())} channels); "
                        f"expected a single-channel label map (L, P or I;16) or a colour mask")
    array = np.asarray(annotation)
    return torch.from_numpy(array.copy() if array.dtype == np.uint8 else array.astype(np.int64))


def size_mismatch(annotation: Image.Image, name: str, labels: torch.Tensor, width: int, height: int) -> str | None:
    """What is wrong when an annotation's label map is not its image's width x height (None: nothing), named by
    the annotation's own file (an annotation PNG, a LabelMe JSON, a COCO entry) and its image's `name`."""
    if labels.shape == (height, width):
        return None
    return (f"{getattr(annotation, 'filename', '') or name}: the annotation is {labels.shape[1]}x{labels.shape[0]} "
            f"(WxH) but its image {name} is {width}x{height}")


class SegmentationDataset(torch.utils.data.Dataset):
    """The samples of one split under a label spec (`data.spec.LabelSpec`: the classes and the mapping of
    stored values to them), transformed, as bytes (see the module's docstring)."""

    def __init__(self, samples, spec, transform, *, train: bool, seed: int = 0, skip_bad: bool = False,
                 corruption=None):
        if isinstance(spec.bands, int):
            raise ValueError("the spec's bands need their statistics (data.build_dataset computes them)")
        self.samples, self.spec, self.transform, self.train = samples, spec, transform, train
        self.class_names, self.num_labels, self.mapping = list(spec.class_names), spec.num_labels, spec.mapping
        self.seed, self.skip_bad = seed, skip_bad
        self.corruption = corruption  # data/corruptions.py: applied to each image as decoded (robustness)
        self.skipped = set()  # names of the bad samples skipped by this process

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """`ds[i]`, or `ds[(epoch, i)]` as the sampler of `build_loader` asks for it."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            image, labels = self.load(index)
        except DataError as e:
            if not self.skip_bad:
                if get_worker_info() is None:
                    raise
                return {"error": str(e)}  # raised by the loader in the main process, as one line
            name = self.samples.name(index)
            if name not in self.skipped:
                warnings.warn(f"skipping bad sample: {e}", stacklevel=2)
            self.skipped.add(name)
            return {"skipped": name, "reason": str(e)}
        with torch.random.fork_rng(devices=[]):  # the global generator is restored afterwards
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            image, labels = self.transform(image, labels)  # uint8 image (float: bands), labels as stored
        if self.spec.bands is not None:  # full-precision bands: normalised here, per band
            image = self.spec.bands.normalize(image)
        pad_to = getattr(self.transform, "pad_to", None)  # a smaller crop is padded, to the mean colour later
        if pad_to is None:
            return {"pixel_values": image, "labels": labels, "index": index}
        valid = tuple(image.shape[-2:])
        image = F.pad(image, (0, pad_to - valid[1], 0, pad_to - valid[0]))
        return {"pixel_values": image, "labels": labels, "valid": torch.tensor(valid), "index": index}

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded, checked and mapped sample: uint8 (3, H, W) image (float (C, H, W) stored values where the
        spec has bands), (H, W) class ids (255 ignored)."""
        image, annotation, name = self.samples[index]
        bands = self.spec.bands
        image = to_tensor(image) if bands is None else to_band_tensor(image, name, bands.count)
        if self.corruption is not None:
            image = self.corruption(image, index)
        labels = self.mapping.apply(annotation_to_tensor(annotation, name, self.mapping))
        if problem := size_mismatch(annotation, name, labels, image.shape[2], image.shape[1]):
            raise DataError(f"{problem} (as displayed: its EXIF orientation applied; an annotation must be drawn on "
                            f"the image as a viewer shows it)")
        if bands is not None:  # a raster's no-data (NaN, infinity): the band mean in, the pixel labelled as the
            image, nodata = fill_nonfinite(image, bands)  # data says ("uncovered": ignored, or class 0)
            if nodata is not None:
                labels = torch.where(nodata, bands.nodata_label, labels)
        highest = max(self.num_labels, 2) - 1  # one class: the binary head's 0/1 masks
        bad = labels[(labels > highest) & (labels != IGNORE_INDEX)].unique()
        if len(bad):
            raise DataError(f"{name}: label values {bad.tolist()[:10]} (labels: {self.mapping.describe()}) are "
                            f"not class ids 0..{highest} nor {IGNORE_INDEX} (ignored); check num_labels "
                            f"and the label convention (--reduce-labels / --no-reduce-labels, dataset.json)")
        return image, labels


def batch_to_device(batch: dict, device, *, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch -> (pixel values, labels) on the device: the bytes become the model's normalised
    float input there, zero (the mean colour) beyond each sample's `valid` size; labels int64."""
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    valid = batch.get("valid")
    pixel_values = normalize_batch(pixel_values, valid)
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    return pixel_values, batch["labels"].to(device, non_blocking=True).long()


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def collate(samples: list[dict]) -> dict:
    """Stack into `pixel_values` (B, 3, H, W) and `labels` (B, H, W); skipped samples are dropped, named in
    `skipped` and explained in `skip_reasons`; the messages of bad samples are in `errors`."""
    kept = [s for s in samples if "pixel_values" in s]
    batch = {"skipped": [s["skipped"] for s in samples if "skipped" in s],
             "skip_reasons": [s["reason"] for s in samples if "skipped" in s],
             "errors": [s["error"] for s in samples if "error" in s]}
    if kept and not batch["errors"]:
        sizes = {tuple(s["pixel_values"].shape) for s in kept} | {tuple(s["labels"].shape) for s in kept}
        if len(sizes) > 2:
            batch["errors"].append(f"samples of different sizes cannot be stacked ({sorted(sizes)}); use "
                                   f"batch_size=1 for the aspect-preserving evaluation")
            return batch
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in kept])
        batch["labels"] = torch.stack([s["labels"] for s in kept])
        if "valid" in kept[0]:
            batch["valid"] = torch.stack([s["valid"] for s in kept])
        if "index" in kept[0]:  # which samples: the evaluation report names them
            batch["indices"] = [s["index"] for s in kept]
    return batch


class EpochSampler(DistributedSampler):
    """`DistributedSampler` (one process: num_replicas=1) that yields (epoch, index) pairs and can
    start part-way through an epoch, for an exact resume."""

    def __init__(self, dataset, *, shuffle: bool, seed: int, drop_last: bool):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Resume at sample `start` (counted on this process) of `epoch`."""
        self.set_epoch(epoch)
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle or self.drop_last:
            return list(super().__iter__())
        # Evaluation: every sample exactly once over all processes (DistributedSampler would pad with
        # repeats to even out the shards, and the repeats would count twice in the metric).
        return list(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self):
        indices = self._indices()[self.start:]
        self.start = 0
        return iter([(self.epoch, i) for i in indices])

    def __len__(self):
        return len(self._indices()) - self.start


class Loader(DataLoader):
    """A DataLoader that raises a bad sample's DataError in the main process, as one line (see above), and
    whose workers can be ended at once (`close`)."""

    def __iter__(self):
        iterator = super().__iter__()
        WORKERS.update(getattr(iterator, "_workers", ()))
        for batch in iterator:
            if batch["errors"]:  # its workers end now, while their queues work (a traceback would keep the
                self._iterator = None  # iterator to a garbage cycle, which closes the queues first)
                end_workers(iterator)
                raise DataError(batch["errors"][0])
            yield batch

    def close(self) -> None:
        """End the workers now (persistent ones live as long as the loader)."""
        iterator, self._iterator = self._iterator, None
        end_workers(iterator)


def end_workers(iterator) -> None:
    """The DataLoader's own shutdown of an iterator's workers, through their queues (none without workers)."""
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


WORKERS = weakref.WeakSet()  # the worker processes of every Loader (multiprocessing keeps them while alive)


def end_workers_at_exit() -> None:
    """Workers ignore SIGTERM (`leave_stops_to_the_main_process`), and SIGTERM is how multiprocessing ends,
    at exit, the workers of a loader that died in a garbage cycle (its queues closed before its shutdown
    could use them); joined next, they would hang the exit. Such leftovers are killed here, first."""
    for worker in list(WORKERS):
        if worker.is_alive():
            worker.kill()


atexit.register(end_workers_at_exit)  # registered after multiprocessing's exit handler: runs before it


def build_loader(dataset: SegmentationDataset, batch_size: int = 2, *, shuffle: bool | None = None,
                 num_workers: int = 0, seed: int = 0, drop_last: bool | None = None,
                 pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over `dataset` with an `EpochSampler` (call `loader.sampler.set_epoch(e)` each
    epoch, as with DistributedSampler). Defaults follow the dataset: shuffling and drop_last for
    training, neither for evaluation."""
    train = dataset.train
    sampler = EpochSampler(dataset, shuffle=train if shuffle is None else shuffle, seed=seed,
                           drop_last=train if drop_last is None else drop_last)
    return Loader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # workers' base seed: leave the global RNG alone
        worker_init_fn=leave_stops_to_the_main_process,
    )


def leave_stops_to_the_main_process(worker_id: int) -> None:
    """Ctrl-C and SIGTERM reach a worker too (the terminal, SLURM and Kubernetes signal the whole process
    group): the worker ignores them, and the main process finishes its step, saves and ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
