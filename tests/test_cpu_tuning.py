"""The CPU settings an attack holds while it runs (mist.engine.cpu_tuning)."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mist.engine import cpu_tuning

BLOCK = 64 * 1024 * 1024  # bytes: above the 32 MB at which glibc would otherwise mmap a fresh block
PAGES = BLOCK // 4096


def faults_of_a_step(sizes=(BLOCK, BLOCK // 2, BLOCK, 2 * BLOCK)) -> int:
    """Minor page faults taken by one imitation of an attack step: large blocks allocated and filled one after the
    other while the earlier ones are still alive (activations), then all freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(size // 4) for size in sizes]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@pytest.fixture
def glibc():
    if cpu_tuning._glibc() is None:
        pytest.skip("the heap settings apply to glibc's malloc only")


@pytest.fixture
def small_pages():
    try:
        huge_pages = "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        huge_pages = False
    if huge_pages:
        pytest.skip("transparent huge pages back every allocation here: faults no longer count 4 KiB pages")


def test_freed_large_blocks_are_reused_while_kept_and_returned_after(glibc, small_pages):
    # In a fresh process: how a heap fragments depends on everything the process allocated before.
    check = "import test_cpu_tuning as t; t.check_heap_reuse()"
    done = subprocess.run([sys.executable, "-c", check], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def check_heap_reuse() -> None:
    assert faults_of_a_step() > PAGES  # without the setting, every step maps its blocks afresh
    with cpu_tuning.keep_freed_memory():
        for _ in range(8):  # the heap grows to hold one step's blocks, in whatever holes earlier use left
            faults_of_a_step()
        with cpu_tuning.keep_freed_memory():
            pass
        # steps then reuse the pages mapped before, also after an inner use left
        assert faults_of_a_step() + faults_of_a_step() < PAGES // 100
        holding = resident_bytes()
    assert resident_bytes() < holding - BLOCK  # leaving the last use returns the freed heap to the kernel


def test_attack_settings_change_nothing_for_other_devices(glibc):
    torch.set_flush_denormal(False)
    with cpu_tuning.attack_settings(torch.device("meta")):
        assert cpu_tuning._holders == 0
    with cpu_tuning.attack_settings(torch.device("cpu")):
        assert cpu_tuning._holders == 1
    with cpu_tuning.attack_settings(torch.device("cpu"), reuse_heap=False):  # low-memory runs keep malloc as it is
        assert cpu_tuning._holders == 0
    assert cpu_tuning._holders == 0


def fake_machine(root, cores_of_cpus: list[tuple[int, int]], cgroup: dict[str, str]):
    """A sysfs with CPU i on (package, core) cores_of_cpus[i], and cgroup files {relative path: text}."""
    for cpu, (package, core) in enumerate(cores_of_cpus):
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "core_id").write_text(f"{core}\n")
        (topology / "physical_package_id").write_text(f"{package}\n")
    for path, text in cgroup.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


SMT_8 = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 0), (0, 1), (0, 2), (0, 3)]  # 4 cores, two threads each


@pytest.mark.parametrize(("cpus", "cgroup", "expected"), [
    (set(range(8)), {}, 4),  # hyper-threads are not cores
    ({0, 4}, {}, 1),  # an affinity mask on one core's two threads
    ({0, 1, 2}, {}, 3),
    (set(range(8)), {"sys/fs/cgroup/cpu.max": "150000 100000\n"}, 2),  # v2 quota of 1.5 CPUs, rounded up
    (set(range(8)), {"sys/fs/cgroup/cpu.max": "max 100000\n"}, 4),
    (set(range(8)), {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "100000", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"},
     1),  # v1 quota
    (set(range(8)), {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1", "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, 4),
])
def test_usable_cores_counts_physical_cores_within_affinity_and_quota(tmp_path, cpus, cgroup, expected):
    assert cpu_tuning.usable_cores(cpus, fake_machine(tmp_path, SMT_8, cgroup)) == expected


def test_usable_cores_is_unknown_without_a_topology(tmp_path):
    assert cpu_tuning.usable_cores({0, 1}, tmp_path) is None


def test_attack_threads_lowers_the_count_to_the_usable_cores_and_restores_it(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_tuning, "usable_cores", lambda: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_tuning.attack_threads():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
        with cpu_tuning.attack_threads():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
