"""Process-level facts: the device, torchrun's variables (read here and nowhere else), seeds."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass

import torch

from synthdistill.errors import SynthdistillError, setting


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun / SLURM launch (rank 0 of 1 when launched alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Read the torch.distributed launch variables (RANK, LOCAL_RANK, WORLD_SIZE)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Join the process group once (NCCL on CUDA, gloo on CPU); a no-op for a single process."""
    if not env.is_distributed or torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)


def waiting_group(env: DistEnv, hours: float = 48.0):
    """A gloo group whose barriers may wait for hours: while rank 0 runs a light but long stage
    (an LLM writing prompts), the other ranks wait here without tripping the NCCL watchdog."""
    if not (env.is_distributed and torch.distributed.is_initialized()):
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours))


def barrier(env: DistEnv, group=None) -> None:
    if env.is_distributed and torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)


def resolve_device(name: str = "auto", env: DistEnv | None = None) -> torch.device:
    """'auto' picks this rank's GPU when there is one, else the CPU."""
    env = env or dist_env()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SynthdistillError(
            f"Device '{name}' was asked for but no CUDA GPU is visible; use {setting('device', 'cpu')}."
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return device


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, class index, prompt index, ...).

    Hash-based, so it does not depend on Python's hash randomisation, the process or the order
    in which work is done.
    """
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting: 'auto' is bf16 on CUDA and fp32 (None) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise SynthdistillError(f"Unknown precision '{precision}'; use one of auto, fp32, bf16, fp16.")
    return table[precision]


def autocast(device: torch.device, precision: str):
    """A context for mixed precision, or a null context in fp32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
