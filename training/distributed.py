"""Processes, devices and random states: what `torchrun` and an exact resume need.

One process per device (NCCL on GPUs, gloo on CPUs). Every process seeds the same initial weights; the
random states of every process (dropout and drop path draw from them) are gathered into each checkpoint,
and collective decisions (stop, a NaN) are agreed with `any_process`, so that all act at the same step.
"""

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from segformer.device import check_device


def setup_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """Under torchrun: one process per device, NCCL on GPUs, gloo on CPUs. Returns (rank, world, device). A
    device this machine does not have is a ConfigError naming it, before anything else is done."""
    device_name = check_device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device_name.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def cleanup(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def any_process(flag: bool, world_size: int, device) -> bool:
    """True on every process when the flag is true on any of them, so that all act at the same step."""
    if world_size == 1:
        return flag
    total = torch.tensor([float(flag)], device=device)
    dist.all_reduce(total)
    return total.item() > 0


def broadcast(value, world_size: int):
    """Rank 0's `value` (any picklable object) on every process."""
    if world_size == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


# ---- random states, as plain values (so that a checkpoint loads with weights_only=True) ----------------

def rng_states() -> dict:
    """This process's generators: Python's, NumPy's (as plain lists), torch's and CUDA's."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    kind, keys, position, has_gauss, gauss = states["numpy"]
    random.setstate(states["python"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(world_size: int) -> list:
    """Every process's random states, for an exact resume on as many processes."""
    states = rng_states()
    if world_size == 1:
        return [states]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, states)
    return gathered
