"""export.py --runtime aoti: an AOTInductor package (.pt2) against eager at any shape, loaded only with
--trust-code.

Run by tests/test_aoti.py, in a process of its own (helpers.run_isolated says why).
"""

import pytest

import export
from helpers import shallow_checkpoint
from segformer.errors import CheckpointError
from segformer.runtimes import graph, load_for_inference


def test_an_aotinductor_package_runs_like_eager_and_only_with_trust_code(tmp_path):
    """A .pt2 is a compiled shared library: loading it runs its code, so it takes --trust-code."""
    model, folder = shallow_checkpoint(tmp_path / "checkpoint")
    export.export_checkpoint(str(folder), tmp_path / "aoti", runtime="aoti")
    with pytest.raises(CheckpointError, match=r"model\.pt2: an AOTInductor package is compiled code .* --trust-code"):
        load_for_inference(tmp_path / "aoti" / "model.pt2")
    package, facts = load_for_inference(tmp_path / "aoti" / "model.pt2", trust_code=True)
    assert facts.runtime == "aoti" and facts.size == 64
    assert graph.largest_difference(package, model, [(3, 3, 100, 130), (1, 3, 64, 64)]) <= 1e-4


