import pytest
import torch

from synthdistill.errors import SynthdistillError
from synthdistill.runtime import autocast_dtype, derive_seed, dist_env, resolve_device


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "image", 3, 7) == derive_seed(0, "image", 3, 7)
    assert derive_seed(0, "image", 3, 7) == 4107617839536421914  # stable across processes and releases
    seeds = {derive_seed(0, "image", c, p) for c in range(20) for p in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, "image", 3, 7) != derive_seed(0, "image", 3, 7)


def test_precision_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cuda, "auto") is torch.bfloat16
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16 and autocast_dtype(cuda, "fp32") is None
    with pytest.raises(SynthdistillError, match="Unknown precision 'fp8'"):
        autocast_dtype(cpu, "fp8")


def test_torchrun_variables_are_read_in_one_place(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    env = dist_env()
    assert (env.rank, env.local_rank, env.world_size, env.is_main, env.is_distributed) == (
        3,
        1,
        4,
        False,
        True,
    )


def test_cuda_without_a_gpu_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SynthdistillError, match="no CUDA GPU is visible; use device=cpu"):
        resolve_device("cuda")
