"""Shared by the distill tests: a tiny stage-3 config, and a real SIGKILL of a ``synthdistill distill``
process after its first checkpoint, then the resumed and the straight runs in this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from synthdistill.cli import main
from synthdistill.config import DistillConfig

TINY_DISTILL = dict(
    teacher="tiny",
    teacher_pretrained=None,
    student="tiny",
    epochs=2,
    batch_size=8,
    lr=2e-3,
    workers=0,
    cache_views=2,
    checkpoint_every=100,
    log_every=1,
)


def tiny_config(**overrides) -> DistillConfig:
    """Tiny teacher -> tiny student on the CPU, the teacher cache on; ``overrides`` replace fields."""
    return DistillConfig(**{**TINY_DISTILL, **overrides})


def kill_after_first_checkpoint(args: Sequence[str], out: Path) -> None:
    """Run ``python -m synthdistill -v ARGS --out OUT`` on one thread and SIGKILL it as soon as it logs
    its first checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "synthdistill", "-v", *args, "--out", str(out)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    for line in process.stderr:  # blocks until the process says it wrote a checkpoint
        if line.startswith("checkpoint "):
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL


def resume_and_run_straight(args: Sequence[str], killed: Path, straight: Path) -> None:
    """Resume the killed run into ``killed`` and run it uninterrupted into ``straight``, both on one
    thread as the killed process ran (float sums depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*args, "--out", str(killed)])
        main([*args, "--out", str(straight)])
    finally:
        torch.set_num_threads(threads)
