"""``train_log.jsonl``: one JSON line per log interval and per event, written by rank 0.

The loss is checked for non-finite values at each log line, from the values the line moves to
the host anyway: no step waits for the device. The keys of the interval's batches are kept so
that a non-finite loss still names its step and samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from synthdistill.data.stream import SourceStats, measure_throughput
from synthdistill.fileio import atomic_write_text
from synthdistill.runtime import DistEnv

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"


@dataclass(frozen=True)
class NonFinite:
    """The first step of a log interval whose loss or gradient norm was not finite."""

    step: int
    loss: float
    keys: list[str]


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step`` (a checkpoint's), dropping what a killed or stopped
    call logged after it: the resumed run writes those steps again, after its own ``start`` line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a process killed while writing it
            continue
        if record.get("step", 0) <= step and record.get("event") != "stopped":
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


class TrainLog:
    """``train_log.jsonl`` (and TensorBoard when installed), written by rank 0.

    Sums loss, cosine and images between log lines on every rank; a line averages them over ranks
    and gives the throughput (new images: padding batches are trained on but not counted).
    """

    def __init__(
        self,
        path: Path,
        env: DistEnv,
        device: torch.device,
        resumed_step: int | None,
        corrupt_keys: list[str],
    ):
        self.env, self.path = env, path
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, cosine, n, new images
        self.corrupt_keys = list(corrupt_keys)  # every rank's, as of the last line
        self.unlogged_corrupt: list[str] = []  # this rank's since then
        self.data_stats = SourceStats()  # streamed data: the epochs finished in this call, all ranks
        self.started = time.perf_counter()
        self.last: dict = {}
        self.interval: list[tuple] = []  # (step, keys, finite?, loss) of each step since the last line
        self.failure: NonFinite | None = None  # set by write() when the interval had a non-finite step
        self.images = 0  # new images trained on, all ranks
        self.tensorboard = None
        if env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_step is None:
                path.unlink(missing_ok=True)
            else:
                truncate_log(path, resumed_step)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))

    def event(self, **record) -> None:
        if self.env.is_main:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def add(
        self, step: int, batch, loss: torch.Tensor, cosine_sum: torch.Tensor, finite: torch.Tensor
    ) -> None:
        """Accumulate a step on the device (no host sync); ``finite`` is its 0-d bool check."""
        self.interval.append((step, batch.keys, finite, loss.detach()))
        self.sums[0] += loss.detach() * len(batch)
        self.sums[1] += cosine_sum.detach()
        self.sums[2] += len(batch)
        self.sums[3] += 0 if batch.padding else len(batch)
        self.unlogged_corrupt += batch.corrupt_keys

    def write(self, step: int, epoch: int, lr: float, remaining_images: int) -> dict:
        """One line: the averages since the last one, the throughput and ETA (``remaining_images``
        over all ranks), and the corrupt images met since (named once)."""
        for key in gather_keys(self.unlogged_corrupt, self.env):
            if key not in self.corrupt_keys:
                self.corrupt_keys.append(key)
                logger.warning("skipped sample '%s': its image does not decode", key)
                self.event(event="corrupt_image", step=step, key=key)
        self.unlogged_corrupt = []
        if self.env.is_distributed:
            torch.distributed.all_reduce(self.sums)
        loss_sum, cosine_sum, count, new_images = self.sums.tolist()
        self.failure = self._first_non_finite(loss_sum)
        rate = measure_throughput(
            new_images / self.env.world_size,
            time.perf_counter() - self.started,
            self.env.world_size,
            remaining_images,
        )
        self.last = {
            "step": step,
            "epoch": epoch,
            "loss": loss_sum / count,
            "lr": lr,
            "images_per_s": rate.total,
            "images_per_s_per_gpu": rate.per_gpu,
            "eta_s": rate.eta_seconds,
            "cosine": cosine_sum / count,
        }
        self.event(**self.last)
        if self.tensorboard is not None:
            for name in ("loss", "lr", "images_per_s", "cosine"):
                self.tensorboard.add_scalar(f"train/{name}", self.last[name], step)
        self.images += int(new_images)
        self.sums.zero_()
        self.started = time.perf_counter()
        return self.last

    def _first_non_finite(self, loss_sum: float) -> NonFinite | None:
        """This rank's first step of the interval with a non-finite loss or gradient (one transfer of
        the flags, beside the sums'); another rank's, when only the summed loss shows it."""
        interval, self.interval = self.interval, []
        if not interval:
            return None
        flags = torch.stack([finite for _, _, finite, _ in interval]).tolist()
        for (step, keys, _, loss), finite in zip(interval, flags, strict=True):
            if not finite:
                return NonFinite(step, loss.item(), keys)
        if not math.isfinite(loss_sum):
            step, keys, _, _ = interval[-1]
            return NonFinite(step, loss_sum, keys)
        return None

    def epoch_end(self, epoch: int, step: int, stats: SourceStats | None) -> None:
        """A line per finished epoch; with streamed data, its counters summed over ranks."""
        record = {"event": "epoch_end", "epoch": epoch, "step": step}
        if stats is not None:
            self.data_stats = self.data_stats + stats
            record.update(dataclasses.asdict(stats))
            if (stats.corrupt or stats.shards_failed) and self.env.is_main:
                logger.warning(
                    "epoch %d: skipped %d samples that do not decode and %d shards that could not be read",
                    epoch,
                    stats.corrupt,
                    stats.shards_failed,
                )
        self.event(**record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def gather_keys(keys: list[str], env: DistEnv) -> list[str]:
    """Every rank's keys, on every rank."""
    if not env.is_distributed:
        return keys
    gathered: list[list[str]] = [[] for _ in range(env.world_size)]
    torch.distributed.all_gather_object(gathered, keys)
    return [key for rank_keys in gathered for key in rank_keys]
