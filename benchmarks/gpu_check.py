"""One prepared GPU check: the CUDA tests, the distillation benchmark, the streamed-data decoding
benchmark (nvjpeg vs workers) and the SDXL-shaped generation benchmark, each in its own process
with its peak memory, into ``gpu_check.json`` and a table::

    python benchmarks/gpu_check.py                # one CUDA GPU, under 8 minutes
    python benchmarks/gpu_check.py --quick        # the same steps at tiny sizes on the CPU (CI)

Random weights of the real architectures throughout: nothing is downloaded. A step that fails
is recorded with its exit code and the tail of its output; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs a script or pytest in this process, then prints its peak memory on a last line:
# CUDA's max allocated bytes when a GPU was used, else the process's max resident set.
WRAPPER = """
import json, resource, runpy, sys
target, argv = sys.argv[1], sys.argv[2:]
code = 0
try:
    if target == "pytest":
        import pytest
        code = int(pytest.main(argv))
    else:
        sys.argv = [target, *argv]
        runpy.run_path(target, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
import torch
gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("GPU_CHECK_PEAK " + json.dumps({"bytes": peak, "kind": "cuda" if gpu else "cpu rss"}))
sys.exit(code)
"""


def steps(quick: bool, out: Path) -> dict[str, list[str]]:
    """Name -> wrapper arguments (a script and its arguments, or pytest and its)."""
    bench_distill = str(ROOT / "benchmarks" / "bench_distill.py")
    bench_generate = str(ROOT / "benchmarks" / "bench_generate.py")
    bench_stream = str(ROOT / "benchmarks" / "bench_stream_decode.py")
    cuda_tests = [
        "pytest",
        "-q",
        "-m",
        "cuda",
        str(ROOT / "tests" / "test_cuda.py"),
        "-p",
        "no:cacheprovider",
    ]
    distill_json = ["--json", str(out / "bench_distill.json")]
    stream_json = ["--json", str(out / "bench_stream_decode.json")]
    if quick:
        tiny_distill = ["--images", "64", "--size", "64", "--epochs", "1", "--batch-size", "16"]
        tiny_generate = ["--model", "tiny", "--images", "2", "--batch-sizes", "2", "--steps", "2"]
        return {
            "pytest -m cuda (skipped without a GPU)": cuda_tests,
            "bench_distill (cpu, tiny)": [bench_distill, "--device", "cpu", *tiny_distill, *distill_json],
            "bench_stream_decode (cpu, tiny)": [
                bench_stream,
                "--device",
                "cpu",
                "--images",
                "64",
                "--size",
                "96",
                "--crop",
                "64",
                "--batch-size",
                "16",
                "--workers",
                "1",
                *stream_json,
            ],  # fmt: skip
            "bench_generate (cpu, tiny)": [bench_generate, "--device", "cpu", *tiny_generate],
        }
    sdxl = ["--device", "cuda", "--model", "sdxl-shaped", "--images", "8", "--batch-sizes", "4"]
    return {
        "pytest -m cuda": cuda_tests,
        "bench_distill --device cuda": [bench_distill, "--device", "cuda", *distill_json],
        "bench_stream_decode --device cuda": [bench_stream, "--device", "cuda", *stream_json],
        "bench_generate sdxl-shaped, 4 steps": [bench_generate, *sdxl, "--steps", "4"],
        "bench_generate sdxl-shaped, 6 steps": [bench_generate, *sdxl, "--steps", "6"],
    }


def run_step(arguments: list[str], timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-c", WRAPPER, *arguments],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        code, output = (
            "timeout",
            (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else "",
        )
    seconds = time.perf_counter() - started
    peak = next(
        (
            json.loads(line.split(" ", 1)[1])
            for line in output.splitlines()
            if line.startswith("GPU_CHECK_PEAK ")
        ),
        None,
    )
    lines = [line for line in output.splitlines() if not line.startswith("GPU_CHECK_PEAK ")]
    return {
        "exit_code": code,
        "seconds": round(seconds, 1),
        "peak_memory_gib": None if peak is None else round(peak["bytes"] / 2**30, 2),
        "peak_memory_kind": None if peak is None else peak["kind"],
        "output_tail": "\n".join(lines[-25:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes on the CPU (CI).")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="Where the JSON goes.")
    parser.add_argument("--step-timeout", type=float, default=None, help="Seconds per step.")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    timeout = args.step_timeout or (120 if args.quick else 240)
    device = "cpu (quick)"
    if not args.quick:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA GPU is visible; run with --quick for the CPU version.")
        device = torch.cuda.get_device_name(0)
    results = {
        name: run_step(arguments, timeout) for name, arguments in steps(args.quick, args.out.parent).items()
    }
    report = {"device": device, "quick": args.quick, "steps": results}
    for bench in ("bench_distill", "bench_stream_decode"):
        figures = args.out.parent / f"{bench}.json"
        if figures.is_file():
            report[bench] = json.loads(figures.read_text())
    args.out.write_text(json.dumps(report, indent=2))

    width = max(map(len, results))
    print(f"\ngpu check on {device}")
    print(f"{'step':{width}}  {'exit':>7}  {'seconds':>8}  {'peak GiB':>9}")
    for name, result in results.items():
        peak = "-" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.2f}"
        print(f"{name:{width}}  {result['exit_code']!s:>7}  {result['seconds']:8.1f}  {peak:>9}")
    for name, result in results.items():
        if result["exit_code"] != 0:
            print(f"\n--- {name} (exit {result['exit_code']}) ---\n{result['output_tail']}")
    print(f"written: {args.out}")
    sys.exit(0 if all(r["exit_code"] == 0 for r in results.values()) else 1)


if __name__ == "__main__":
    main()
