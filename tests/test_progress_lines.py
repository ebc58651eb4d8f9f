"""Off a terminal (piped, CI, SLURM logs) the long stages print plain progress lines, distill's
labelled with the epoch and showing the loss, and a resumed run says where it resumes."""

import re

from synthdistill.config import DistillConfig
from synthdistill.train import distill_student


def test_distill_off_a_terminal_prints_its_epoch_loss_and_where_it_resumes(tmp_path, write_shards, capsys):
    shards = write_shards(tmp_path / "shards", 16, shard_size=16)
    config = DistillConfig(
        teacher="tiny", teacher_pretrained=None, student="tiny", epochs=2, batch_size=8, workers=0,
        cache_views=1, checkpoint_every=1, log_every=1,
    )  # fmt: skip
    out = tmp_path / "student"
    distill_student(shards, out, config, seed=0, device="cpu", stop_after_steps=3)
    first = capsys.readouterr().err
    assert "distill epoch 2/2: 3/4 steps (75%)" in first and re.search(r", loss \d\.\d{4}", first)
    assert "teacher cache: 2/2 batches (100%)" in first
    assert "resuming" not in first
    distill_student(shards, out, config, seed=0, device="cpu")
    second = capsys.readouterr().err
    assert "resuming from step 3 of 4" in second
    assert "distill epoch 2/2: 4/4 steps (100%)" in second
