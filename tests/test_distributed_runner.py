"""The test suite's process runner: a rank that dies fails the run at once, naming its exit code, with its
Python stacks in stderr; a rank that hangs has its stacks written before the run fails."""
from __future__ import annotations

import pytest

from distributed_runner import run_distributed


def _rank1_crashes(rank, world_size):
    import ctypes

    if rank == 1:
        ctypes.string_at(0)  # SIGSEGV
    return rank


def _rank1_hangs(rank, world_size):
    import time

    if rank == 1:
        time.sleep(600)
    return rank


def test_a_crashed_rank_fails_the_run_at_once_with_its_stacks():
    with pytest.raises(RuntimeError, match=r"died without a result: rank 1 exit code -11") as failure:
        run_distributed(_rank1_crashes, 2, timeout=120)
    assert "Segmentation fault" in str(failure.value) and "_rank1_crashes" in str(failure.value)


def test_a_hung_rank_writes_its_stacks_before_the_run_fails():
    with pytest.raises(RuntimeError, match=r"workers \[1\] sent no result in time") as failure:
        run_distributed(_rank1_hangs, 2, timeout=3)
    assert "_rank1_hangs" in str(failure.value)
