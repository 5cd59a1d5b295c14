"""export.py --runtime aoti (an AOTInductor package against eager at any shape, loaded only with --trust-code):
tests/isolated/aoti_checks.py, run in a process of its own (helpers.run_isolated says why)."""

from helpers import run_isolated


def test_aoti_checks_pass_in_a_process_of_their_own():
    run_isolated("aoti_checks")
