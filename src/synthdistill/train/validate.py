"""Validation during training and the chain of training stages.

- :func:`check_init_exists`: a dataset recipe starts from the student of a domain-agnostic run
  (``runs/datacomp_medium/student``); when that is missing, ``run`` and ``distill`` stop before
  any work with the three ways on.
- :class:`EpochEnd`: what happens when an epoch ends: zero-shot top-1 of the student on the real
  test sets (``validation`` records in ``train_log.jsonl``) and, with ``keep_checkpoints: all``,
  that epoch's checkpoint kept as ``checkpoints/epoch-E/``. Only rank 0 validates; the others wait.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import temporary_name
from synthdistill.registry import Domain
from synthdistill.runtime import DistEnv, barrier, waiting_group
from synthdistill.student import CHECKPOINT_WEIGHTS_NAME, CONFIG_NAME

logger = logging.getLogger(__name__)

EPOCH_CHECKPOINT_PREFIX = "epoch-"
CHAIN_RECIPES = ("configs/datacomp_medium.yaml", "configs/imagenet.yaml", "configs/synthci30m.yaml")


def check_init_exists(path: str | Path | None) -> None:
    """Refuse a ``distill.init`` that is not there (or whose training has not finished) before any
    work starts, naming the three ways on: train the domain-agnostic student, pass another one, or
    start from random weights."""
    if path is None:
        return
    path = Path(path)
    finished = (path / CONFIG_NAME).is_file() or (path / CHECKPOINT_WEIGHTS_NAME).is_file()
    if finished or (path.is_dir() and any(path.glob("step-*"))):
        return
    first, *others = CHAIN_RECIPES
    state = "does not exist" if not path.exists() else "holds no finished student"
    raise SynthdistillError(
        f"The starting student distill.init '{path}' {state}: run {first} (or {', or '.join(others)}) "
        "first, pass another student with --set distill.init=PATH, or train from random weights with "
        "--set distill.init=null (far below the teacher: see the README, 'Reproducing the paper')."
    )


@dataclass(frozen=True)
class ValidationData:
    """The real test sets the student is validated on, as the evaluate stage would read them:
    registry ``datasets`` under ``data_root``, in batches of ``batch_size`` read by ``workers``."""

    datasets: tuple[str, ...]
    data_root: str
    batch_size: int = 128
    workers: int = 0


def validation_data(
    datasets: Sequence[str], domain: Domain, data_root: str, batch_size: int, workers: int
) -> ValidationData:
    """``evaluate.datasets``, else the domain's own registry test set (a user's classes have none)."""
    own = (domain.name,) if domain.eval is not None else ()
    return ValidationData(tuple(datasets) or own, str(data_root), batch_size, workers)


def validation_epochs(every: int | None, epochs: int) -> set[int]:
    """The (0-based) epochs after which the student is validated: every ``every``-th and the last."""
    if every is None:
        return set()
    return {epoch for epoch in range(epochs) if (epoch + 1) % every == 0} | {epochs - 1}


def epoch_checkpoint(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"{EPOCH_CHECKPOINT_PREFIX}{epoch:04d}"


def keep_checkpoint(step_dir: Path, kept: Path) -> Path:
    """``kept`` becomes a copy of the checkpoint ``step_dir`` (hard links where the filesystem has
    them: no second write), written under a temporary name and renamed."""
    tmp = temporary_name(kept)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for source in step_dir.iterdir():
        try:
            os.link(source, tmp / source.name)
        except OSError:
            shutil.copy2(source, tmp / source.name)
    if kept.exists():
        shutil.rmtree(kept)
    os.replace(tmp, kept)
    return kept


def read_events(log_path: Path) -> list[dict]:
    """The event records of a training log (``validation``, ``epoch_end``, ...)."""
    if not log_path.is_file():
        return []
    records = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a torn last line
            continue
        if "event" in record:
            records.append(record)
    return records


def read_validation(log_path: Path) -> list[dict]:
    """The ``validation`` records of a training log."""
    return [r for r in read_events(log_path) if r["event"] == "validation"]


def main_says(env: DistEnv, value: bool) -> bool:
    """Rank 0's ``value`` on every rank (rank 0 alone reads the training log)."""
    if not (env.is_distributed and torch.distributed.is_initialized()):
        return value
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0)
    return bool(shared[0])


@dataclass(frozen=True)
class BestEpoch:
    epoch: int
    top1: float  # mean over the validated datasets
    checkpoint: str | None  # checkpoints/epoch-E when kept


def best_epoch(records: list[dict], checkpoint_dir: Path) -> BestEpoch | None:
    """The epoch with the highest mean validation top-1 (the earliest of equals)."""
    by_epoch: dict[int, list[float]] = {}
    for record in records:
        by_epoch.setdefault(record["epoch"], []).append(record["top1"])
    if not by_epoch:
        return None
    means = {epoch: sum(values) / len(values) for epoch, values in sorted(by_epoch.items())}
    epoch = max(means, key=lambda e: (means[e], -e))
    kept = epoch_checkpoint(checkpoint_dir, epoch)
    return BestEpoch(epoch, means[epoch], str(kept) if kept.is_dir() else None)


class EpochEnd:
    """Validation and kept checkpoints at the end of an epoch, called by the loop with the step
    reached; ``save(step)`` writes the newest checkpoint (a collective) and returns its folder on rank 0.
    A call resumed (``resumed_from``, at ``step``) at an epoch's end first finishes that epoch's work.

    ``student`` maps images to unit embeddings; ``teacher`` builds the zero-shot heads. A test set
    that is missing is named in one log line and not tried again; training goes on.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        teacher,
        data: ValidationData | None,
        protocol: str,
        every: int | None,
        keep: str,
        epochs: int,
        start_epoch: int,
        checkpoint_dir: Path,
        log_event: Callable[..., None],
        env: DistEnv,
        device: torch.device,
        log_path: Path,
        step: int,
        resumed_from: Path | None,
        save: Callable[[int], Path | None],
    ):
        self.student, self.teacher, self.protocol = student, teacher, protocol
        self.datasets = list(data.datasets) if data and every is not None else []
        self.data = data
        self.epochs = validation_epochs(every, epochs) if self.datasets else set()
        self.keep, self.checkpoint_dir = keep, Path(checkpoint_dir)
        self.log_event, self.env, self.device, self.save = log_event, env, device, save
        self.group = waiting_group(env) if self.epochs else None
        if every is not None and not self.datasets and env.is_main:
            logger.warning("distill.validate_every is set but there is no registry test set to validate on")
        if env.is_main and self.checkpoint_dir.is_dir():  # epochs this call trains again
            for old in self.checkpoint_dir.glob(f"{EPOCH_CHECKPOINT_PREFIX}*"):
                if old.is_dir() and int(old.name[len(EPOCH_CHECKPOINT_PREFIX) :]) >= start_epoch:
                    shutil.rmtree(old)
        if resumed_from is not None:
            self.finish_resumed_epoch(start_epoch - 1, step, resumed_from, log_path)

    def finish_resumed_epoch(self, epoch: int, step: int, resumed_from: Path, log_path: Path) -> None:
        """A call resumed from the checkpoint saved at the end of ``epoch`` does what the stopped
        call may not have done after saving it: validate that epoch, keep its checkpoint."""
        records = read_events(log_path) if self.env.is_main else []
        ended = any(
            r.get("event") == "epoch_end" and (r["epoch"], r["step"]) == (epoch, step) for r in records
        )
        if not main_says(self.env, ended):
            return
        validated = any(r["event"] == "validation" and r["epoch"] == epoch for r in records)
        if epoch in self.epochs and not main_says(self.env, validated):
            self.validate_on_main(epoch, step)
        kept = epoch_checkpoint(self.checkpoint_dir, epoch)
        if self.keep == "all" and self.env.is_main and not kept.is_dir():
            keep_checkpoint(resumed_from, kept)

    def __call__(self, epoch: int, step: int) -> None:
        if epoch in self.epochs:
            self.validate_on_main(epoch, step)
        if self.keep == "all":
            saved = self.save(step)
            if self.env.is_main and saved is not None:
                keep_checkpoint(saved, epoch_checkpoint(self.checkpoint_dir, epoch))

    def validate_on_main(self, epoch: int, step: int) -> None:
        if self.env.is_main:
            self.validate(epoch, step)
        barrier(self.env, self.group)

    def validate(self, epoch: int, step: int) -> None:
        """One ``validation`` record per test set present; the global RNG is left as it was, so a
        validated run trains exactly as one that is not."""
        from synthdistill.evaluate import zero_shot_top1

        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        for dataset in list(self.datasets):
            with torch.random.fork_rng(devices=devices):
                top1 = zero_shot_top1(
                    self.student,
                    self.student.config.preprocessing,
                    self.teacher,
                    dataset,
                    self.data.data_root,
                    self.protocol,
                    device=self.device,
                    batch_size=self.data.batch_size,
                    workers=self.data.workers,
                )
            if top1 is None:  # zero_shot_top1 logged why; not asked again
                self.datasets.remove(dataset)
                continue
            logger.info("epoch %d: validation top-1 on %s (%s) %.4f", epoch, dataset, self.protocol, top1)
            self.log_event(
                event="validation", epoch=epoch, step=step, dataset=dataset, protocol=self.protocol, top1=top1
            )
