"""A Python tool that runs model-written code in a sandbox (``appo.tools.sandbox``).

Semantics for the model: the code runs like a script; if it prints nothing and its last statement is an
expression, that expression's ``repr`` is printed (as in a REPL), so ``<python>2+3</python>`` gives ``5``.
The result is the merged stdout+stderr (errors as the last lines of the traceback), followed by a status
line when something went wrong ("TimeoutError: ... exceeded 5 s", "MemoryError: ...", "Killed by signal ...").
The status line is decided by the parent from what it observed itself (its clock, its byte count, its CPU
meter, the cgroup's events, and the sandbox init's report on a pipe model code never holds), never from the
code's exit code or output.

Each call gets a fresh sandbox (see ``appo/tools/sandbox/bwrap.py``): bubblewrap namespaces (PID, network,
IPC, UTS, mount), a read-only view of the interpreter only (``view.py``), a private size-limited /tmp as
working directory, a seccomp filter (``seccomp_filter.py``), no capabilities, an unprivileged uid (leased
across processes when appo runs as root, a user namespace otherwise), non-dumpable processes, die-with-parent.
One memory, task and CPU budget covers the whole sandbox through a cgroup where one can be made; elsewhere
the bounds are per process (RLIMIT_AS x process limit, + the /tmp size; memfd and SysV shared memory are
refused by the filter) and the parent counts the call's CPU time over /proc. The parent ends every call by
killing the sandbox's PID-namespace init (``supervisor.py``): at the wall-clock deadline, past
``max_capture_bytes`` of output or ``cpu_time_s`` of CPU, every process of the call is gone when ``run``
returns, with or without a cgroup.

Where no sandbox can be built (no bubblewrap, no seccomp bindings, user namespaces disabled), constructing
the tool raises ``SandboxUnavailable`` saying what to install. The README's Security section explains the
opt-out for machines that cannot have a sandbox (``allow_unconfined=True``, $APPO_ALLOW_UNCONFINED_CODE=1):
rlimits and a bypassable audit hook, nothing more.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import warnings

from appo.tools.base import Tool
from appo.tools.sandbox import SandboxUnavailable, cgroups, detect, identities
from appo.tools.sandbox.bwrap import CHILD_SCRIPT, data_fd, sandbox_environment
from appo.tools.sandbox.seccomp_filter import filter_program
from appo.tools.sandbox.supervisor import Outcome, Supervisor, tree_cpu_seconds
from appo.tools.sandbox.view import site_packages

__all__ = ["PythonTool", "SandboxUnavailable", "SANDBOX_UIDS", "ALLOW_UNCONFINED_ENV", "HOW_TO_GET_A_SANDBOX"]

SANDBOX_UIDS = identities.SANDBOX_UIDS
ALLOW_UNCONFINED_ENV = "APPO_ALLOW_UNCONFINED_CODE"
HOW_TO_GET_A_SANDBOX = ("to get one, install bubblewrap >= 0.7 and util-linux (apt-get install bubblewrap "
                        "util-linux) and the seccomp bindings (pip install pyseccomp); scripts/install.sh "
                        "does all three; the README's Security section says what the sandbox needs")
_ENTER_CGROUP = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
_CPU_TICK_S = 0.05  # the kernel's CPU accounting granularity, and then some


class PythonTool(Tool):
    """Run Python code in a sandbox; ``run`` returns the output string and never raises.

    timeout_s: wall-clock limit; cpu_time_s: CPU seconds one call may use, all its processes together
    (RLIMIT_CPU on each process, and the parent stops the call when their sum passes it; default: the wall
    limit rounded up, plus 1 s); memory_mb: the sandbox's memory budget (a cgroup limit where possible, and
    RLIMIT_AS per process); max_processes: processes and threads the code may add; disk_mb: size of its /tmp
    (the working directory, also /dev/shm); max_file_mb: RLIMIT_FSIZE; max_open_files: RLIMIT_NOFILE;
    max_capture_bytes: stdout+stderr beyond this stops the sandbox; max_code_chars: longer code is refused;
    allow_unconfined: run code without a sandbox where none can be built (None: read
    $APPO_ALLOW_UNCONFINED_CODE; default refuse).
    """

    name = "python"
    tag = "python"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, cpu_time_s: int | None = None,
                 max_processes: int = 8, disk_mb: int = 64, max_file_mb: int = 16, max_open_files: int = 64,
                 max_output_chars: int = 1024, max_capture_bytes: int = 65536, max_code_chars: int = 100_000,
                 allow_unconfined: bool | None = None):
        positive = (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_processes", max_processes),
                    ("disk_mb", disk_mb), ("max_file_mb", max_file_mb), ("max_open_files", max_open_files),
                    ("max_output_chars", max_output_chars), ("max_capture_bytes", max_capture_bytes),
                    ("max_code_chars", max_code_chars))
        for arg, value in positive:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{arg}: must be a positive number, got {value!r}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb: the interpreter alone needs about 40 MiB, got {memory_mb}")
        if disk_mb >= memory_mb:
            raise ValueError(f"disk_mb: the /tmp files live in memory; need disk_mb < memory_mb, "
                             f"got {disk_mb}")
        if max_file_mb > disk_mb:
            raise ValueError(f"max_file_mb: must not exceed disk_mb ({disk_mb}), got {max_file_mb}")
        if cpu_time_s is not None and (isinstance(cpu_time_s, bool) or not cpu_time_s >= 1):
            raise ValueError(f"cpu_time_s: must be at least 1 (whole seconds), got {cpu_time_s!r}")
        self.timeout_s = float(timeout_s)
        self.cpu_time_s = int(cpu_time_s) if cpu_time_s is not None else int(-(-timeout_s // 1)) + 1
        self.memory_mb, self.max_processes, self.disk_mb = int(memory_mb), int(max_processes), int(disk_mb)
        self.max_file_mb, self.max_open_files = int(max_file_mb), int(max_open_files)
        self.max_output_chars, self.max_capture_bytes = int(max_output_chars), int(max_capture_bytes)
        self.max_code_chars = int(max_code_chars)
        if allow_unconfined is None:
            allow_unconfined = os.environ.get(ALLOW_UNCONFINED_ENV, "") == "1"
        try:
            self.confinement = detect()
        except SandboxUnavailable as error:
            if not allow_unconfined:
                raise SandboxUnavailable(f"the python tool runs model code only in a sandbox, and none can "
                                         f"be built here: {error}; {HOW_TO_GET_A_SANDBOX}") from None
            warnings.warn(f"PythonTool runs model code UNCONFINED (allow_unconfined): {error}", stacklevel=2)
            self.confinement = None

    @property
    def memory_bound_mb(self) -> int | None:
        """The most memory one call can hold: the cgroup budget, or without one the per-process bound times
        the process limit plus the /tmp size (None: unconfined, no bound)."""
        if self.confinement is None:
            return None
        if cgroups.controls_memory():
            return self.memory_mb
        return self.memory_mb * (self.max_processes + 2) + self.disk_mb

    def run(self, text: str) -> str:
        """Execute ``text`` as a Python script in a fresh sandbox; output plus a status line if any."""
        try:
            code = textwrap.dedent(text).strip("\n")
            if len(code) > self.max_code_chars:
                return f"Error: code is {len(code)} characters; the limit is {self.max_code_chars}"
            run = self._run_confined if self.confinement is not None else self._run_unconfined
            return self._format(*run(code))
        except Exception as error:  # the tool contract: never raise into the rollout loop
            return f"SandboxError: {type(error).__name__}: {error}"

    def _limits(self) -> dict:
        mib = 1024 * 1024
        return {"RLIMIT_AS": self.memory_mb * mib, "RLIMIT_CPU": self.cpu_time_s,
                "RLIMIT_NPROC": self.max_processes + 2, "RLIMIT_FSIZE": self.max_file_mb * mib,
                "RLIMIT_NOFILE": self.max_open_files, "RLIMIT_CORE": 0, "RLIMIT_MSGQUEUE": 0}

    def _watch(self, supervisor: Supervisor, cpu_meter, cpu_poll_s: float) -> Outcome:
        return supervisor.run(timeout_s=self.timeout_s, capture_bytes=self.max_capture_bytes,
                              cpu_limit_s=self.cpu_time_s, cpu_meter=cpu_meter, cpu_poll_s=cpu_poll_s)

    def _run_confined(self, code: str) -> tuple[bytes, str | None]:
        confinement = self.confinement
        with contextlib.ExitStack() as stack:
            uid = stack.enter_context(identities.UidLease()) if confinement.mode == "root" else None
            budget = cgroups.CgroupBudget.create(self.memory_mb * 1024 * 1024, self.max_processes + 4)
            if budget is not None:
                stack.callback(budget.close)
            fds = _Descriptors(stack)
            code_fd = fds.keep(data_fd(code.encode("utf-8", "surrogateescape")))
            seccomp_fd = fds.keep(data_fd(filter_program()))
            lifeline, _ = fds.pipe()  # the sandbox lives while this process holds the write end
            status_read, status_write = fds.pipe()
            info_read, info_write = fds.pipe()
            config = {"limits": self._limits(), "lifeline": lifeline, "status": status_write}
            argv = confinement.command(config=config, code_fd=code_fd, seccomp_fd=seccomp_fd,
                                       disk_bytes=self.disk_mb * 1024 * 1024, uid=uid, info_fd=info_write)
            if budget is not None:
                argv = ["/bin/sh", "-c", _ENTER_CGROUP, "appo-sandbox", *budget.procs_files, "--", *argv]
            passed = (code_fd, seccomp_fd, lifeline, status_write, info_write)
            supervisor = Supervisor(argv, {"PATH": "/usr/bin:/bin"}, pass_fds=passed, info_fd=info_read,
                                    status_fd=status_read,
                                    close_after_start=fds.release(status_write, info_write))
            counted = budget is not None and budget.cpu_seconds() is not None
            meter = (lambda _init: budget.cpu_seconds()) if counted else tree_cpu_seconds
            outcome = self._watch(supervisor, meter, 0.1 if counted else 0.5)  # a /proc scan costs ~5 ms
            if not outcome.clean and uid is not None:
                _wait_until_uid_is_free(uid)  # before the uid is leased again
            if counted:
                outcome.cpu_s = max(outcome.cpu_s or 0.0, budget.cpu_seconds() or 0.0)
            oom = budget is not None and budget.oom_killed()
        return outcome.output, self._status(outcome, oom)

    def _run_unconfined(self, code: str) -> tuple[bytes, str | None]:
        workdir = tempfile.mkdtemp(prefix="appo_unconfined_")
        try:
            with contextlib.ExitStack() as stack:
                fds = _Descriptors(stack)
                status_read, status_write = fds.pipe()
                code_path = os.path.join(workdir, ".appo_code.py")
                with open(code_path, "w", encoding="utf-8", errors="surrogateescape") as file:
                    file.write(code)
                config = {"limits": self._limits(), "code_path": code_path, "workdir": workdir,
                          "audit_hook": True, "site": list(site_packages()), "status": status_write,
                          "lifeline": None}
                argv = [sys.executable, "-I", "-S", "-B", CHILD_SCRIPT, repr(config)]
                supervisor = Supervisor(argv, sandbox_environment(workdir), pass_fds=(status_write,),
                                        info_fd=None, status_fd=status_read, cwd=workdir,
                                        close_after_start=fds.release(status_write))
                outcome = self._watch(supervisor, None, 0.25)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return outcome.output, self._status(outcome, False)

    def _status(self, outcome: Outcome, oom: bool) -> str | None:
        """The status line, from what the parent saw: its own stop, the cgroup's OOM count, its CPU figure,
        and the init's report (the code's exit code is reported as such, never read as a sandbox state)."""
        cpu_exceeded = f"TimeoutError: CPU time limit of {self.cpu_time_s} s exceeded (killed)"
        if outcome.stop == "timeout":
            return f"TimeoutError: execution exceeded {self.timeout_s:g} s (killed)"
        if outcome.stop == "output":
            return f"OutputLimitError: output exceeded {self.max_capture_bytes} bytes (stopped)"
        if outcome.stop == "cpu":
            return cpu_exceeded
        events = outcome.events
        if "running" not in events:
            reasons = [e.split(" ", 1)[1] for e in events if e.startswith("setup-failed ")]
            words = reasons or (outcome.errors.splitlines()[-1:] if outcome.errors else [])
            detail = f": {words[-1]}" if words else ""
            return f"SandboxError: the sandbox could not be set up{detail}; the code was not run"
        if oom:
            return f"MemoryError: the sandbox used up its memory budget of {self.memory_mb} MiB (killed)"
        kind, _, value = (events[-1] if events[-1] != "running" else "lost").partition(" ")
        if kind == "signal":
            if outcome.cpu_s is not None and outcome.cpu_s >= self.cpu_time_s - _CPU_TICK_S:
                return cpu_exceeded
            signum = int(value)
            name = signal.Signals(signum).name if 0 < signum < signal.NSIG else str(signum)
            return f"Killed by signal {name}"
        if kind == "exit":
            return None if int(value) in (0, 1) else f"Process exited with status {value}"  # 1: a traceback
        return "SandboxError: the sandbox ended before the code did (its init reported no exit)"

    def _format(self, output: bytes, status: str | None) -> str:
        """Decode; keep head and tail (tracebacks end the output) within max_output_chars; add status."""
        text = output.decode("utf-8", "replace").rstrip()
        budget = self.max_output_chars - (len(status) + 1 if status else 0)
        if len(text) > budget:
            keep = max(0, budget - len(f"\n...[{len(text)} chars omitted]...\n"))
            head, tail = keep // 2, keep - keep // 2
            text = f"{text[:head]}\n...[{len(text) - keep} chars omitted]...\n{text[len(text) - tail:]}"
        parts = [p for p in (text, status) if p]
        return "\n".join(parts) if parts else "(no output)"


class _Descriptors:
    """File descriptors of one call, closed when its ExitStack unwinds, unless ``release``d earlier."""

    def __init__(self, stack: contextlib.ExitStack):
        self._open: set[int] = set()
        stack.callback(self._close_all)

    def keep(self, fd: int) -> int:
        self._open.add(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        return self.keep(read_end), self.keep(write_end)

    def release(self, *fds: int) -> tuple[int, ...]:
        """Hand ``fds`` over to the caller, who closes them."""
        self._open.difference_update(fds)
        return fds

    def _close_all(self) -> None:
        for fd in self._open:
            os.close(fd)
        self._open.clear()


def _wait_until_uid_is_free(uid: int, timeout_s: float = 2.0) -> None:
    """Wait (bounded) until ``uid`` owns no process, zombies included (only needed when bubblewrap had to be
    killed: see supervisor.py)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and uid in identities.uids_with_processes(include_zombies=True):
        time.sleep(0.01)
