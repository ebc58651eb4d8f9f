"""What an image encoder costs: latency in the runtime it ships in (ONNX Runtime), FLOPs and parameters.

Latency is wall time per call after warm-up, over as many calls as a time budget allows (at least
``min_runs``): the median, with the quartiles and the extremes as its spread, so one figure is
stable and the reader sees how stable. Threads are set and named, since they decide the figure.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthdistill.deploy.predict import require_export_extra

LATENCY_BATCHES = (1, 32)
WARMUP_RUNS = 3
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over the timed runs of one measurement."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = sorted(1000.0 * s for s in seconds)
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
        return cls(statistics.median(ms), q1, q3, ms[0], ms[-1], len(ms))

    def to_dict(self) -> dict:
        return {
            "median_ms": round(self.median_ms, 3),
            "iqr_ms": [round(self.q1_ms, 3), round(self.q3_ms, 3)],
            "min_ms": round(self.min_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "runs": self.runs,
        }


def time_calls(
    call: Callable[[], object], budget_s: float, min_runs: int, warmup: int = WARMUP_RUNS
) -> Timing:
    """Time ``call()`` after ``warmup`` untimed calls: repeat until ``budget_s`` seconds have passed
    and at least ``min_runs`` calls were timed (a slow model gets fewer runs, a fast one many)."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return Timing.of(times)


@dataclass(frozen=True)
class LatencyRow:
    """One model form, on one execution provider, at one batch size."""

    model: str
    precision: str
    provider: str
    threads: int
    batch_size: int
    timing: Timing

    @property
    def milliseconds(self) -> float:
        return self.timing.median_ms

    @property
    def images_per_second(self) -> float:
        return 1000.0 * self.batch_size / self.timing.median_ms

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "precision": self.precision,
            "provider": self.provider,
            "threads": self.threads,
            "batch_size": self.batch_size,
            **self.timing.to_dict(),
        }


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), the default intra-op thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def latency_providers() -> list[str]:
    """ONNX Runtime's CPU provider, and CUDA's when this onnxruntime build has it."""
    _, ort = require_export_extra()
    return [CPU_PROVIDER] + ([CUDA_PROVIDER] if CUDA_PROVIDER in ort.get_available_providers() else [])


def onnx_session(path: str | Path, provider: str = CPU_PROVIDER, threads: int | None = None):
    """An InferenceSession on one provider with ``threads`` intra-op threads (one inter-op thread)."""
    _, ort = require_export_extra()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=[provider])


def measure_onnx_latency(
    path: str | Path,
    model: str,
    precision: str,
    image_size: int,
    *,
    providers: list[str],
    threads: int | None,
    budget_s: float,
    min_runs: int,
    batches: tuple[int, ...] = LATENCY_BATCHES,
) -> list[LatencyRow]:
    """Latency of the ONNX file ``path`` (input (N, 3, S, S) float32) per provider and batch size."""
    rows = []
    threads = threads or usable_cpus()
    for provider in providers:
        session = onnx_session(path, provider, threads)
        feed_name = session.get_inputs()[0].name
        for batch_size in batches:
            images = np.random.default_rng(batch_size).random((batch_size, 3, image_size, image_size))
            feed = {feed_name: images.astype(np.float32)}
            timing = time_calls(lambda s=session, f=feed: s.run(None, f), budget_s, min_runs)
            rows.append(LatencyRow(model, precision, provider, threads, batch_size, timing))
    return rows


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable, images) -> int:
    """FLOPs of one call, counted by PyTorch's own FlopCounterMode (a multiply-add counts 2).

    Two gaps of the counter on CPU are closed: nn.MultiheadAttention's fused inference path (no
    formula: open_clip's attention would count as zero) is switched off while counting, and CPU
    flash attention gets the formula the GPU kernels have.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(
        display=False,
        custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops},
    )
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            fn(images)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


def describe_machine() -> str:
    """CPU model, cores and onnxruntime version: what the latency numbers were measured on."""
    _, ort = require_export_extra()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu} ({platform.machine()}), {os.cpu_count()} logical CPUs ({usable_cpus()} usable), "
        f"{platform.system()} {platform.release()}, onnxruntime {ort.__version__}"
    )
