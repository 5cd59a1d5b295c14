"""export.py --runtime openvino (fp32 against eager at any shape, bf16 and int8 in their precisions, infer.py
on model.xml, each runtime's refusals):
tests/isolated/openvino_checks.py, run in a process of its own (helpers.run_isolated says why)."""

from helpers import run_isolated


def test_openvino_checks_pass_in_a_process_of_their_own():
    run_isolated("openvino_checks")
