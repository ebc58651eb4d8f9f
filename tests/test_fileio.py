"""Atomic writes and the lock that keeps two writers off one output."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import exclusive_lock


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
