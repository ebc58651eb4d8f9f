"""Under DDP the batch-wide losses see the whole global batch: 2 gloo processes equal 1 process."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from synthdistill.losses import BatchGroup, LossSettings, WeightedLoss

SPECS = ("vl", "mpc", "i2i", "fd:0.5,vl:0.5", "fd:1,mpc:0.5,i2i:0.5")
BATCH_WIDE = ("vl", "mpc", "i2i")  # every rank computes the global batch's value itself
WORLD_SIZE, PER_RANK, WIDTH, EMBED, CLASSES = 2, 4, 6, 5, 3


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "inputs": torch.randn(WORLD_SIZE * PER_RANK, WIDTH, generator=generator),
        "teacher": torch.randn(WORLD_SIZE * PER_RANK, EMBED, generator=generator),
        "labels": torch.tensor([0, 1, 1, 2, 0, 0, 2, 1]),  # classes repeat within and across ranks
        "class_text": nn.functional.normalize(torch.randn(CLASSES, EMBED, generator=generator), dim=-1),
    }


class StudentAndLoss(nn.Module):
    """A small linear student and the loss (a learnable temperature) as one module, as in training."""

    def __init__(self, spec: str, batch_group: BatchGroup):
        super().__init__()
        torch.manual_seed(1)
        self.student = nn.Linear(WIDTH, EMBED)
        self.loss = WeightedLoss(
            spec, LossSettings(logit_scale=10.0, learnable_temperature=True), batch_group
        )

    def forward(self, inputs, teacher, labels, class_text) -> torch.Tensor:
        return self.loss(self.student(inputs), teacher, labels, class_text)


def loss_and_gradients(spec: str, rows: slice, batch_group: BatchGroup) -> dict[str, torch.Tensor]:
    """The loss of this process's rows and the gradients the optimiser would see: averaged over
    the ranks, which is what DDP's backward does (its wrapper itself would import torch._dynamo,
    20 s on a busy machine)."""
    batch = global_batch()
    model = StudentAndLoss(spec, batch_group)
    value = model(batch["inputs"][rows], batch["teacher"][rows], batch["labels"][rows], batch["class_text"])
    value.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    if batch_group.world_size > 1:
        for gradient in gradients.values():
            torch.distributed.all_reduce(gradient)
            gradient /= batch_group.world_size
    return {"loss": value.detach(), **gradients}


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        group = BatchGroup(rank=rank, world_size=WORLD_SIZE)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {spec: loss_and_gradients(spec, rows, group) for spec in SPECS}
        uneven = slice(0, 3) if rank == 0 else slice(3, None)  # a batch that lost images that did not decode
        results.update({f"uneven {spec}": loss_and_gradients(spec, uneven, group) for spec in BATCH_WIDE})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # spawned, not forked: a child forked from a process whose OpenMP pool has run hangs in its first
    # parallel op (GNU libgomp is not fork-safe)
    mp.start_processes(run_rank, args=(str(out / "init"), str(out)), nprocs=WORLD_SIZE, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("spec", SPECS)
def test_two_processes_give_the_loss_and_gradients_of_one(two_ranks, spec):
    one = loss_and_gradients(spec, slice(None), BatchGroup())
    ranks = [results[spec] for results in two_ranks]
    mean_loss = sum(r["loss"] for r in ranks) / WORLD_SIZE  # the log's average over ranks
    assert torch.allclose(mean_loss, one["loss"], atol=1e-6)
    if spec in BATCH_WIDE:
        for r in ranks:
            assert torch.allclose(r["loss"], one["loss"], atol=1e-6)
    for name in one:
        if name != "loss":
            for r in ranks:
                assert torch.allclose(r[name], one[name], atol=1e-6), (spec, name)


def test_one_rank_alone_sees_only_its_share(two_ranks):
    """Without the gather, rank 0's batch-wide loss would be another number: the test can fail."""
    alone = loss_and_gradients("vl", slice(0, PER_RANK), BatchGroup())
    assert not torch.allclose(alone["loss"], two_ranks[0]["vl"]["loss"], atol=1e-3)


@pytest.mark.parametrize("spec", BATCH_WIDE)
def test_ranks_with_unequal_shares_still_give_the_global_batchs_loss(two_ranks, spec):
    one = loss_and_gradients(spec, slice(None), BatchGroup())
    for results in two_ranks:
        for name, value in results[f"uneven {spec}"].items():
            assert torch.allclose(value, one[name], atol=1e-6), name
