"""torch.distributed set-up for `torchrun`: gloo on CPU, nccl on GPU, a no-op when alone.

Training and synthesis call `init_distributed()` once; without torchrun's environment it
returns a single-process DistInfo so the same code runs on a laptop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffmix.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` checked against this machine; None means CUDA when available, else CPU.

    torch accepts "cuda" on a CPU-only build and fails only at the first use, deep in a run
    (after its folder was made) and with a message about `torch._C`; an unknown name fails
    with a RuntimeError. Both are a user's choice of option, so both are a ConfigError here,
    raised before any work starts.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {str(device)!r}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
            raise ConfigError(
                f"device {str(device)!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"{build}); use cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {str(device)!r}: Apple MPS is not available on this machine; use cpu")
        return dev
    raise ConfigError(f"device {str(device)!r}: diffmix runs on cpu, cuda or mps, not {dev.type}")


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if launched under torchrun; pick the device.

    `device` None means: CUDA (this rank's local GPU) when available, else CPU; a device this
    machine does not have is a ConfigError (see `resolve_device`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
