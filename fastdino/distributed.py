"""Process-group setup for the three launchers: plain `python` (one process), `torchrun` and
`deepspeed` (both set RANK / WORLD_SIZE / LOCAL_RANK). gloo on CPU, nccl on CUDA."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda if available, else cpu; cuda -> this process's GPU (local_rank, made current);
    cuda:N; cpu. Raises ValueError (one line) when CUDA is asked for and there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{name} requested but no CUDA device is available")
        index = int(name.split(":", 1)[1]) if ":" in name else local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def init_distributed(device_name: str, local_rank_arg: int | None = None) -> DistContext:
    from fastdino.config import ConfigError

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    try:
        device = resolve_device(device_name, local_rank)
    except ValueError as e:
        raise ConfigError(f"config key 'train.device': {e}") from None
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        # DDP reducers nothing references any more go first, while their process group is alive: a gloo
        # group destroyed by a reducer's last reference (GIL held) can deadlock on its worker threads
        gc.collect()
        dist.destroy_process_group()
