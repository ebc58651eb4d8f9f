"""Checkpoints of a distillation run: weights, optimiser, schedule, gradient scaler, data position
and every rank's RNG state."""

from __future__ import annotations

import io
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from synthdistill.errors import SynthdistillError, argument
from synthdistill.fileio import atomic_path, atomic_write_json
from synthdistill.runtime import DistEnv
from synthdistill.student import CHECKPOINT_WEIGHTS_NAME, CONFIG_NAME, Student

logger = logging.getLogger(__name__)

STATE_NAME = "state.pt"


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch's CPU generator, the CUDA generator of ``device`` (when
    training on one), numpy's and Python's. As plain values and tensors, so ``torch.load`` reads it
    with ``weights_only=True``."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "cpu": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "python": [version, list(python_state), gauss_next],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_rng(seed: int) -> None:
    """Seed every generator :func:`rng_state` saves (torch's, CUDA's, numpy's, Python's), so that a
    fresh run's random state, and with it its checkpoints, is a function of the seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved, in this process."""
    torch.set_rng_state(state["cpu"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(env: DistEnv, device: torch.device) -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (a collective under DDP): stochastic depth draws
    different masks on every rank, so an exact resume needs each rank's own generators back."""
    own = rng_state(device)
    if not env.is_distributed:
        return [own]
    gathered: list = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, own)
    return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in gathered]


def write_file(path: Path, data: bytes) -> None:
    """The one write of a checkpoint's files (Python's file API: a full disk raises ENOSPC here,
    which :func:`~synthdistill.fileio.atomic_path` turns into one sentence)."""
    with open(path, "wb") as handle:
        handle.write(data)


class Checkpoints:
    """``step-NNNNNNNN/`` folders (weights.safetensors with the distiller's state, the student's
    config.json, state.pt); the newest is the resume point.

    A folder is written under a hidden name and renamed when complete (a full disk is one sentence
    naming the folder, and leaves no partial folder); older ones are then removed.
    """

    def __init__(self, directory: Path, identity: str):
        self.directory, self.identity = Path(directory), identity

    def latest(self) -> Path | None:
        found = sorted(self.directory.glob("step-*")) if self.directory.is_dir() else []
        return found[-1] if found else None

    def clear(self) -> None:
        for path in self.directory.glob("step-*") if self.directory.is_dir() else []:
            shutil.rmtree(path)

    def save(
        self, step: int, distiller: nn.Module, optimizer, scheduler, scaler, rng: list[dict], state: dict
    ) -> Path:
        """Write ``step-N/``: the distiller's weights (the student's under ``student.``, so a step
        folder is a ``distill.init``), the student's config, and the training state."""
        from safetensors.torch import save

        final = self.directory / f"step-{step:08d}"
        weights = {k: v.detach().cpu().contiguous() for k, v in distiller.state_dict().items()}
        training = io.BytesIO()
        torch.save(
            {
                **state,
                "step": step,
                "identity": self.identity,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng,
            },
            training,
        )
        with atomic_path(final) as tmp:
            tmp.mkdir()
            write_file(tmp / CHECKPOINT_WEIGHTS_NAME, save(weights, metadata={"format": "pt"}))
            student = getattr(distiller, "student", None)
            if isinstance(student, Student):
                atomic_write_json(tmp / CONFIG_NAME, student.config.to_json())
            write_file(tmp / STATE_NAME, training.getvalue())
            if final.exists():
                shutil.rmtree(final)
        logger.info("checkpoint %s", final)
        for older in self.directory.glob("step-*"):
            if older != final:
                shutil.rmtree(older)
        return final

    def load(
        self, path: Path, distiller: nn.Module, optimizer, scheduler, scaler, device: torch.device
    ) -> dict:
        """Restore weights, optimizer, scheduler and scaler; return the saved state (step, rng, ...)."""
        from safetensors.torch import load_file

        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        if state.get("identity") != self.identity:
            raise SynthdistillError(
                f"The checkpoint '{path}' was made under another config, other training data or (on the "
                f"run's shards) another number of processes; delete '{path.parent}' (or rerun `distill` "
                f"with {argument('--no-resume', 'resume=False')}) to start over, or choose another --out."
            )
        distiller.load_state_dict(load_file(str(path / CHECKPOINT_WEIGHTS_NAME), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return state
