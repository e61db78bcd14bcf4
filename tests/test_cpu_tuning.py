"""The CPU settings an attack holds while it runs (mist.cpu_tuning)."""

import resource

import pytest
import torch

from mist import cpu_tuning

BLOCK = 64 * 1024 * 1024  # bytes: above the 32 MB at which glibc would otherwise mmap a fresh block
PAGES = BLOCK // 4096


def faults_of_a_fresh_block() -> int:
    """Minor page faults taken while allocating, filling and freeing one large block, after one such block was
    allocated and freed just before."""
    del_first = torch.ones(BLOCK // 4)
    del del_first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(BLOCK // 4)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@pytest.fixture
def glibc():
    if cpu_tuning._glibc() is None:
        pytest.skip("the heap settings apply to glibc's malloc only")


def test_freed_large_blocks_are_reused_while_kept_and_returned_after(glibc):
    with cpu_tuning.keep_freed_memory():
        assert faults_of_a_fresh_block() < PAGES // 100  # the pages freed a moment ago are mapped again, not faulted
        with cpu_tuning.keep_freed_memory():
            pass
        assert faults_of_a_fresh_block() < PAGES // 100  # an inner use leaving does not undo the outer one's setting
        holding = resident_bytes()
    assert resident_bytes() < holding - BLOCK // 2  # leaving the last use returns the freed heap to the kernel


def test_attack_settings_change_nothing_for_other_devices(glibc):
    torch.set_flush_denormal(False)
    with cpu_tuning.attack_settings(torch.device("meta")):
        assert cpu_tuning._holders == 0
    with cpu_tuning.attack_settings(torch.device("cpu")):
        assert cpu_tuning._holders == 1
    assert cpu_tuning._holders == 0
