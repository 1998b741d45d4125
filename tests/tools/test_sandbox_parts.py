"""The sandbox's parts on their own: uid leases across processes, the per-call cgroup, the seccomp program."""

import os
import subprocess
import sys
import time

import pytest

from appo.tools.sandbox import cgroups, seccomp_filter
from appo.tools.sandbox.identities import UidLease

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from appo.tools.sandbox.identities import UidLease
with UidLease(range({first}, {first} + 1), {folder!r}) as uid:
    print(uid, flush=True)
    time.sleep(60)
"""
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def lock_dir(tmp_path):
    folder = tmp_path / "uids"
    return str(folder)


def test_leases_are_distinct_within_a_process(lock_dir):
    uids = range(5000, 5003)
    with UidLease(uids, lock_dir) as a, UidLease(uids, lock_dir) as b, UidLease(uids, lock_dir) as c:
        assert sorted([a, b, c]) == [5000, 5001, 5002]
        with pytest.raises(RuntimeError, match="all 3 sandbox uids are in use"):
            UidLease(uids, lock_dir).__enter__()
    with UidLease(uids, lock_dir) as again:  # released on exit
        assert again in uids


def test_a_lease_held_by_another_process_is_skipped_and_freed_when_it_dies(lock_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, first=7000, folder=lock_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "7000"
        with UidLease(range(7000, 7002), lock_dir) as uid:
            assert uid == 7001
        with pytest.raises(RuntimeError):
            UidLease(range(7000, 7001), lock_dir).__enter__()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait()
    with UidLease(range(7000, 7001), lock_dir) as uid:
        assert uid == 7000


def test_a_lock_folder_others_could_write_is_refused(lock_dir):
    os.makedirs(lock_dir)
    os.chmod(lock_dir, 0o777)
    with pytest.raises(RuntimeError, match="writable only by it"):
        UidLease(range(1, 2), lock_dir).__enter__()


def test_seccomp_program_is_built_and_denies_what_it_lists():
    assert seccomp_filter.available() is None
    program = seccomp_filter.filter_program()
    assert len(program) > 0 and len(program) % 8 == 0  # struct sock_filter entries
    assert {"memfd_create", "unshare", "mount", "ptrace", "bpf", "io_uring_setup"} <= set(seccomp_filter.DENIED)


@pytest.mark.skipif(cgroups.layout() is None, reason="no cgroup this process may create children in")
def test_a_budget_cgroup_is_limited_and_removed_and_stale_ones_are_swept():
    version, parents = cgroups.layout()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = os.path.join(parents["memory"], f"appo-sandbox-{dead}-0")
    os.mkdir(stale)
    cgroups._swept.clear()
    budget = cgroups.CgroupBudget.create(64 << 20, 5)
    try:
        assert not os.path.exists(stale)
        memory = budget.directories["memory"]
        limit = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        with open(os.path.join(memory, limit)) as file:
            assert int(file.read()) == 64 << 20
        sleeper = subprocess.Popen(["/bin/sh", "-c", f'echo $$ > "{budget.procs_files[0]}"; exec sleep 60'])
        time.sleep(0.2)
        assert budget.oom_killed() is False
    finally:
        budget.close()
    assert sleeper.wait(timeout=5) == -9  # close() killed what was left
    assert not os.path.exists(memory)
