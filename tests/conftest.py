"""Fixtures shared by the tests (the helpers they use are in helpers.py)."""

import pytest

from helpers import hf_segmentation_model


@pytest.fixture(scope="session")
def hf_b0_dir(tmp_path_factory):
    """A random-weight reference B0 (7 labels) saved in the hub layout, shared by several tests."""
    directory = tmp_path_factory.mktemp("hf_b0")
    hf_segmentation_model("b0", 7).save_pretrained(directory)
    return directory
