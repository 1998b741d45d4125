"""One memory, task and CPU budget for a whole sandbox, through a cgroup made for each call.

Where this process may create child cgroups, each call gets ``<our cgroup>/appo-sandbox-<pid>-<n>``: a memory
limit (every process of the sandbox, its tmpfs pages and any shared memory included; no swap) where the memory
controller is available, a task limit where the pids controller is, and a CPU-time counter the parent reads
(``cpu_seconds``: v2's cpu.stat, which every v2 cgroup has, or v1's cpuacct). Layouts, first found first:
  - cgroup v2 with the memory controller enabled in our own cgroup's ``cgroup.subtree_control`` (delegated);
  - cgroup v1 with a writable memory hierarchy (a root parent on a v1 or hybrid host), plus pids and cpuacct
    where writable;
  - cgroup v2 without controllers (our own cgroup writable): the CPU counter and ``cgroup.kill`` only;
  - cgroup v1 with only pids or cpuacct writable.
Otherwise ``CgroupBudget.create`` returns None and the caller falls back to per-process bounds. Ending a call
never depends on a cgroup (the PID namespace does that, see supervisor.py); ``close`` is a second sweep: it
kills whatever is left (v2: ``cgroup.kill``) and removes the cgroup. Directories left by a process that was
SIGKILLed are swept on the next start.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import signal
import threading
import time

_NAME = re.compile(r"appo-sandbox-(\d+)-\d+$")
_counter = itertools.count()
_sweep_lock = threading.Lock()
_swept: set[str] = set()


@functools.lru_cache(maxsize=1)
def layout() -> tuple[str, dict[str, str]] | None:
    """("v2" | "v1", {what: parent directory}) where a budget can be made here, else None. Keys: "memory",
    "pids" (controllers), "cpu" (a CPU counter: v2's cpu.stat or v1's cpuacct), "cgroup" (v2: every call's
    single directory)."""
    mounts = _cgroup_mounts()
    own = _own_cgroups()
    v2 = None
    if "" in own and "cgroup2" in mounts:
        parent = mounts["cgroup2"] + own[""]
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as file:
                enabled = file.read().split()
        except OSError:
            enabled = None
        if enabled is not None and os.access(parent, os.W_OK):
            v2 = {"cgroup": parent, "cpu": parent, **{c: parent for c in ("memory", "pids") if c in enabled}}
    v1 = {}
    for key, controller in (("memory", "memory"), ("pids", "pids"), ("cpu", "cpuacct")):
        if controller in mounts and controller in own:
            parent = mounts[controller] + own[controller]
            if os.access(parent, os.W_OK):
                v1[key] = parent
    for version, parents in (("v2", v2), ("v1", v1)):
        if parents and "memory" in parents:
            return version, parents
    for version, parents in (("v2", v2), ("v1", v1)):
        if parents:
            return version, parents
    return None


def controls_memory() -> bool:
    """True when each call's cgroup holds a memory limit on this machine."""
    found = layout()
    return found is not None and "memory" in found[1]


def _cgroup_mounts() -> dict[str, str]:
    """{"cgroup2": mount point} and {v1 controller: mount point} from /proc/self/mountinfo."""
    found = {}
    try:
        with open("/proc/self/mountinfo") as file:
            lines = file.read().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        if rest[0] == "cgroup2":
            found.setdefault("cgroup2", point)
        elif rest[0] == "cgroup":
            for option in rest[2].split(","):
                found.setdefault(option, point)
    return found


def _own_cgroups() -> dict[str, str]:
    """{controller: our cgroup path} from /proc/self/cgroup; the v2 entry is keyed by ""."""
    own = {}
    try:
        with open("/proc/self/cgroup") as file:
            for line in file:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for controller in controllers.split(",") if controllers else [""]:
                    own[controller.removeprefix("name=")] = path.rstrip("/")
    except (OSError, ValueError):
        pass
    return own


class CgroupBudget:
    """The cgroup(s) of one sandbox call. ``procs_files``: where the sandbox's first process writes its
    pid."""

    def __init__(self, version: str, directories: dict[str, str]):
        self.version, self.directories = version, directories

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.directories.values())]

    @classmethod
    def create(cls, memory_bytes: int, max_tasks: int) -> "CgroupBudget | None":
        """A new budget of ``memory_bytes`` (no swap) and ``max_tasks`` tasks; None where none can be made."""
        found = layout()
        if found is None:
            return None
        version, parents = found
        name = f"appo-sandbox-{os.getpid()}-{next(_counter)}"
        budget = cls(version, {})
        try:
            for controller, parent in parents.items():
                _sweep_stale(parent)
                path = os.path.join(parent, name)
                if path not in budget.directories.values():
                    os.mkdir(path, 0o755)
                budget.directories[controller] = path
            budget._set_limits(memory_bytes, max_tasks)
        except OSError:
            budget.close()
            raise
        return budget

    def _set_limits(self, memory_bytes: int, max_tasks: int) -> None:
        memory = self.directories.get("memory")
        if memory is not None and self.version == "v2":
            _write(memory, "memory.max", memory_bytes)
            _write(memory, "memory.swap.max", 0, optional=True)
        elif memory is not None:
            _write(memory, "memory.limit_in_bytes", memory_bytes)
            _write(memory, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
        if "pids" in self.directories:
            _write(self.directories["pids"], "pids.max", max_tasks)

    def cpu_seconds(self) -> float | None:
        """CPU seconds used by every process that was ever in this cgroup (None where not counted)."""
        directory = self.directories.get("cpu")
        try:
            if directory is not None and self.version == "v2":
                with open(os.path.join(directory, "cpu.stat")) as file:
                    for line in file:
                        if line.startswith("usage_usec "):
                            return int(line.split()[1]) / 1e6
            elif directory is not None:
                with open(os.path.join(directory, "cpuacct.usage")) as file:
                    return int(file.read()) / 1e9
        except (OSError, ValueError):
            pass
        return None

    def oom_killed(self) -> bool:
        """True when the kernel killed a process of this sandbox for passing the memory limit."""
        memory = self.directories.get("memory")
        if memory is None:
            return False
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            with open(os.path.join(memory, name)) as file:
                for line in file:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except (OSError, ValueError, TypeError):
            pass
        return False

    def close(self, timeout_s: float = 2.0) -> None:
        """Kill every process still in the cgroup(s) and remove them (retrying while the kernel drains)."""
        deadline = time.monotonic() + timeout_s
        for path in sorted(set(self.directories.values())):
            if self.version == "v2":
                try:
                    _write(path, "cgroup.kill", 1, optional=True)  # the kernel kills all, forks in flight too
                except OSError:
                    pass
            while True:
                _kill_all(path)
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        self.directories = {}


def _write(directory: str, name: str, value: int, optional: bool = False) -> None:
    path = os.path.join(directory, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as file:
        file.write(str(value))


def _kill_all(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.procs")) as file:
            pids = [int(line) for line in file if line.strip()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _sweep_stale(parent: str) -> None:
    """Once per parent and process: remove the sandbox cgroups of appo processes that no longer exist."""
    with _sweep_lock:
        if parent in _swept:
            return
        _swept.add(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        match = _NAME.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(parent, name)
        _kill_all(path)
        try:
            os.rmdir(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
