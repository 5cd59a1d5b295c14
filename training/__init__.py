"""Helpers of `train.py`, kept beside it as torchvision keeps `references/segmentation/utils.py`: the typed
run configuration (`config.py`) and the run folder with its checkpoints (`checkpoints.py`). Run from the
repository; not part of the installed `segformer` library."""
