"""Where and how a model runs, named once for every script: the device (`--device`, checked when parsed)
and mixed precision (`--amp off|bf16|fp16`)."""

import torch

from .errors import ConfigError

AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, amp: str):
    """The autocast context of `amp`; with "off" a no-op (no branch at the call site)."""
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp], enabled=amp != "off")


def check_device(name: str) -> str:
    """A device name that this machine has ("cpu", "cuda", "cuda:1", "mps"), or a ConfigError saying which
    it has."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name}: not a device name; expected {available_devices()}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ConfigError(f"--device {name}: this machine has no {device.type} device; expected {available_devices()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); expected "
                          f"{available_devices()}")
    return name


def available_devices() -> str:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp made concrete for a device: "auto" is bf16 on CUDA devices that have it, off elsewhere; fp16
    (with a GradScaler) needs CUDA."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    return amp
