"""Checkpoints of a distillation run: weights, optimiser, schedule, data position and RNG state."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from synthdistill.config import DistillConfig, config_hash, hashed_settings
from synthdistill.errors import SynthdistillError, argument
from synthdistill.fileio import temporary_name

logger = logging.getLogger(__name__)


def run_hash(config: DistillConfig, seed: int, data_id: str) -> str:
    """What a checkpoint must share with this call to be resumed: the settings that change training,
    and the data (``TrainData.identity``)."""
    return config_hash(hashed_settings(config), seed, data_id)


class Checkpoints:
    """``step-NNNNNNNN/`` folders (weights.safetensors + state.pt); the newest is the resume point.

    A folder is written under a hidden name and renamed when complete; older ones are then removed.
    """

    def __init__(self, directory: Path, run_hash: str):
        self.directory, self.run_hash = Path(directory), run_hash

    def latest(self) -> Path | None:
        found = sorted(self.directory.glob("step-*")) if self.directory.is_dir() else []
        return found[-1] if found else None

    def clear(self) -> None:
        for path in self.directory.glob("step-*") if self.directory.is_dir() else []:
            shutil.rmtree(path)

    def save(self, step: int, distiller: nn.Module, optimizer, scheduler, state: dict) -> Path:
        from safetensors.torch import save_file

        final = self.directory / f"step-{step:08d}"
        tmp = temporary_name(final)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            weights = {k: v.detach().cpu().contiguous() for k, v in distiller.state_dict().items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(
                {
                    **state,
                    "step": step,
                    "run_hash": self.run_hash,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng,
                },
                tmp / "state.pt",
            )
        except BaseException:  # an interrupted save leaves no hidden half checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("checkpoint %s", final)
        for older in self.directory.glob("step-*"):
            if older != final:
                shutil.rmtree(older)
        return final

    def load(self, path: Path, distiller: nn.Module, optimizer, scheduler, device: torch.device) -> dict:
        """Restore weights, optimizer and scheduler; return the saved state (step, rng, ...)."""
        from safetensors.torch import load_file

        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if state["run_hash"] != self.run_hash:
            raise SynthdistillError(
                f"The checkpoint '{path}' was made under another config, other training data or (on the "
                f"run's shards) another number of processes; delete '{path.parent}' (or rerun `distill` "
                f"with {argument('--no-resume', 'resume=False')}) to start over, or choose another --out."
            )
        distiller.load_state_dict(load_file(str(path / "weights.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
