"""export.py --runtime executorch (an XNNPACK-delegated program against eager at its size, another size
refused, infer.py and serve.py on it):
tests/isolated/executorch_checks.py, run in a process of its own (helpers.run_isolated says why)."""

from helpers import run_isolated


def test_executorch_checks_pass_in_a_process_of_their_own():
    run_isolated("executorch_checks")
