"""Mixed precision, named once: `--amp off|bf16|fp16` everywhere (training, evaluation, inference)."""

import torch

AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, amp: str):
    """The autocast context of `amp`; with "off" a no-op (no branch at the call site)."""
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp], enabled=amp != "off")
