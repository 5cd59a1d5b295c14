"""Fixtures shared by the tests (the helpers they use are in helpers.py)."""

import os
import random

import numpy as np
import pytest
import torch

from helpers import hf_segmentation_model

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, a thread each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def same_random_state_for_every_test():
    """Each test starts from the same random state, whatever ran before it (in this order or another, here or
    on CI's machine): a test whose random weights or images happen to suit it cannot pass or fail by its place."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hf_b0_dir(tmp_path_factory):
    """A random-weight reference B0 (7 labels) saved in the hub layout, shared by several tests."""
    directory = tmp_path_factory.mktemp("hf_b0")
    hf_segmentation_model("b0", 7).save_pretrained(directory)
    return directory
