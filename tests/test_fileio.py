"""Atomic writes, the lock that keeps two writers off one output, what a killed writer leaves, a full disk."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import (
    FOREIGN_TEMPORARY_AGE_S,
    atomic_path,
    exclusive_lock,
    remove_stale_temporaries,
)


def test_a_second_writer_is_refused_in_one_sentence_while_another_process_holds_the_lock(tmp_path):
    lock = tmp_path / ".shard-000000.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from synthdistill.fileio import exclusive_lock
            with exclusive_lock({str(lock)!r}, "shard 0"):
                print("held", flush=True)
                sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(SynthdistillError, match="Another process is writing shard 0"),
            exclusive_lock(lock, "shard 0"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "shard 0"):  # a killed holder's lock is free again
        assert lock.exists()
    assert not lock.exists()  # released locks leave no file behind


def test_a_killed_writer_leaves_a_temporary_and_a_lock_that_only_a_dead_writer_loses(tmp_path):
    out = tmp_path / "out" / "model.bin"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from synthdistill.fileio import atomic_path, exclusive_lock
            out = Path({str(out)!r})
            with exclusive_lock(out.parent / ".model.bin.lock", "the model"), atomic_path(out) as tmp:
                tmp.write_bytes(b"half a model")
                print("writing", flush=True)
                sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        left = sorted(p.name for p in out.parent.iterdir())
        assert len(left) == 2 and left[0] == ".model.bin.lock" and left[1].startswith(".model.bin.tmp-")
        assert remove_stale_temporaries(tmp_path) == []  # its writer is alive: keep everything
        assert len(list(out.parent.iterdir())) == 2
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert len(list(out.parent.iterdir())) == 2  # SIGKILL: no cleanup code ran
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == left
    assert list(out.parent.iterdir()) == []


def test_stale_temporary_folders_go_and_everything_else_stays(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid, host = int(dead.stdout), socket.gethostname()
    checkpoint = tmp_path / "checkpoints" / f".step-00000004.tmp-{host}-{dead_pid}"
    (checkpoint / "inner").mkdir(parents=True)
    (checkpoint / "inner" / "weights.safetensors").write_bytes(b"w")
    mine = tmp_path / f".index.json.tmp-{host}-{os.getpid()}"
    fresh_foreign = tmp_path / "shards" / f".shard-000001.tar.tmp-othernode-{dead_pid}"
    old_foreign = tmp_path / "shards" / f".shard-000002.tar.tmp-othernode-{dead_pid}"
    kept = [tmp_path / "shards" / "shard-000000.tar", tmp_path / ".prompts.jsonl.progress.jsonl", mine]
    for path in [fresh_foreign, old_foreign, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    two_days_ago = time.time() - 2 * FOREIGN_TEMPORARY_AGE_S
    os.utime(old_foreign, (two_days_ago, two_days_ago))
    with exclusive_lock(tmp_path / ".held.lock", "something"):
        removed = remove_stale_temporaries(tmp_path)
        assert (tmp_path / ".held.lock").exists()
    assert sorted(removed) == sorted([checkpoint, old_foreign])
    assert all(path.exists() for path in [*kept, fresh_foreign]) and not checkpoint.exists()
    assert remove_stale_temporaries(tmp_path / "missing") == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_sentence_naming_the_folder_and_leaves_no_partial_file(tmp_path, code):
    target = tmp_path / "shards" / "index.json"
    with (
        pytest.raises(SynthdistillError, match=r"disk is full.*'.*shards'") as raised,
        atomic_path(target) as tmp,
    ):
        tmp.write_bytes(b"partial")
        raise OSError(code, os.strerror(code), str(tmp))
    assert "\n" not in str(raised.value)
    assert list((tmp_path / "shards").iterdir()) == []


def test_a_temporary_folder_is_removed_on_a_full_disk_and_other_errors_stay_as_they_are(tmp_path):
    target = tmp_path / "export" / "open_clip"
    with pytest.raises(SynthdistillError, match="disk is full"), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(target.parent.iterdir()) == []
    with pytest.raises(PermissionError), atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        raise PermissionError(errno.EACCES, "Permission denied")
    assert list(target.parent.iterdir()) == []


def test_a_file_s_folder_can_be_cleaned_without_its_subfolders(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    suffix = f"tmp-{socket.gethostname()}-{int(dead.stdout)}"
    here, below = tmp_path / f".prompts.jsonl.{suffix}", tmp_path / "sub" / f".other.{suffix}"
    below.parent.mkdir()
    here.write_bytes(b"x")
    below.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, recursive=False) == [here]
    assert below.exists()
