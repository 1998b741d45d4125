"""A Python tool that runs model-written code in a sandbox (``appo.tools.sandbox``).

Semantics for the model: the code runs like a script; if it prints nothing and its last statement is an
expression, that expression's ``repr`` is printed (as in a REPL), so ``<python>2+3</python>`` gives ``5``.
The result is the merged stdout+stderr (errors as the last lines of the traceback), followed by a status
line when something went wrong ("TimeoutError: ... exceeded 5 s", "MemoryError: ...", "Killed by signal ...").

Each call gets a fresh sandbox (see ``appo/tools/sandbox/bwrap.py``): bubblewrap namespaces (PID, network,
IPC, UTS, mount), a read-only view of the interpreter only, a private size-limited /tmp as working directory,
a seccomp filter, no capabilities, an unprivileged uid (leased across processes when appo runs as root, a
user namespace otherwise), die-with-parent. One memory and task budget covers the whole sandbox through a
cgroup where one can be made; elsewhere the bounds are per process (RLIMIT_AS x process limit, + the /tmp size;
memfd and SysV shared memory are refused by the filter). The parent kills the sandbox at the wall-clock
deadline or when the output passes ``max_capture_bytes``.

Where no sandbox can be built (no bubblewrap, no seccomp bindings, user namespaces disabled), constructing
the tool raises ``SandboxUnavailable``; model code then runs only if the user opts in with
``allow_unconfined=True`` (or APPO_ALLOW_UNCONFINED_CODE=1): rlimits and a bypassable audit hook, nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

from appo.tools.base import Tool
from appo.tools.sandbox import SandboxUnavailable, detect
from appo.tools.sandbox.bwrap import CHILD_SCRIPT, data_fd, sandbox_environment
from appo.tools.sandbox.cgroups import CgroupBudget
from appo.tools.sandbox.identities import SANDBOX_UIDS, UidLease, uids_with_processes
from appo.tools.sandbox.seccomp_filter import filter_program
from appo.tools.sandbox.view import site_packages

__all__ = ["PythonTool", "SandboxUnavailable", "SANDBOX_UIDS", "ALLOW_UNCONFINED_ENV"]

ALLOW_UNCONFINED_ENV = "APPO_ALLOW_UNCONFINED_CODE"
_SETUP_FAILED_EXIT = 121  # child.py could not set up: the code was not run
_ENTER_CGROUP = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


class PythonTool(Tool):
    """Run Python code in a sandbox; ``run`` returns the output string and never raises.

    timeout_s: wall-clock limit; cpu_time_s: RLIMIT_CPU per process (default: the wall limit rounded up, plus
    1 s); memory_mb: the sandbox's memory budget (a cgroup limit where possible, and RLIMIT_AS per process);
    max_processes: processes and threads the code may add; disk_mb: size of its /tmp (the working directory,
    also /dev/shm); max_file_mb: RLIMIT_FSIZE; max_open_files: RLIMIT_NOFILE; max_capture_bytes: stdout+stderr
    beyond this stops the sandbox; max_code_chars: longer code is refused; allow_unconfined: run code without a
    sandbox where none can be built (None: read $APPO_ALLOW_UNCONFINED_CODE; default refuse).
    """

    name = "python"
    tag = "python"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, cpu_time_s: int | None = None,
                 max_processes: int = 8, disk_mb: int = 64, max_file_mb: int = 16, max_open_files: int = 64,
                 max_output_chars: int = 1024, max_capture_bytes: int = 65536, max_code_chars: int = 100_000,
                 allow_unconfined: bool | None = None):
        for arg, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_processes", max_processes),
                           ("disk_mb", disk_mb), ("max_file_mb", max_file_mb), ("max_open_files", max_open_files),
                           ("max_output_chars", max_output_chars), ("max_capture_bytes", max_capture_bytes),
                           ("max_code_chars", max_code_chars)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{arg}: must be a positive number, got {value!r}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb: the interpreter alone needs about 40 MiB, got {memory_mb}")
        if disk_mb >= memory_mb:
            raise ValueError(f"disk_mb: the /tmp files live in memory; need disk_mb < memory_mb, got {disk_mb}")
        if max_file_mb > disk_mb:
            raise ValueError(f"max_file_mb: must not exceed disk_mb ({disk_mb}), got {max_file_mb}")
        if cpu_time_s is not None and not cpu_time_s > 0:
            raise ValueError(f"cpu_time_s: must be positive, got {cpu_time_s!r}")
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
                raise SandboxUnavailable(
                    f"{error}. Model code is never run unconfined unless asked: pass allow_unconfined=True "
                    f"(or set {ALLOW_UNCONFINED_ENV}=1) to run it with rlimits only") from None
            warnings.warn(f"PythonTool runs model code UNCONFINED (allow_unconfined): {error}", stacklevel=2)
            self.confinement = None

    @property
    def memory_bound_mb(self) -> int | None:
        """The most memory one call can hold: the cgroup budget, or without one the per-process bound times the
        process limit plus the /tmp size (None: unconfined, no bound)."""
        from appo.tools.sandbox.cgroups import layout
        if self.confinement is None:
            return None
        if layout() is not None:
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

    def _run_confined(self, code: str) -> tuple[bytes, str | None]:
        confinement = self.confinement
        with contextlib.ExitStack() as stack:
            uid = stack.enter_context(UidLease()) if confinement.mode == "root" else None
            budget = CgroupBudget.create(self.memory_mb * 1024 * 1024, self.max_processes + 4)
            if budget is not None:
                stack.callback(budget.close)
            code_fd = data_fd(code.encode("utf-8", "surrogateescape"))
            stack.callback(os.close, code_fd)
            seccomp_fd = data_fd(filter_program())
            stack.callback(os.close, seccomp_fd)
            lifeline, lifeline_end = os.pipe()  # the sandbox lives while this process holds lifeline_end open
            stack.callback(os.close, lifeline)
            ends = stack.enter_context(_Closing(lifeline_end))
            config = {"limits": self._limits(), "lifeline": lifeline}
            argv = confinement.command(config=config, code_fd=code_fd, seccomp_fd=seccomp_fd,
                                       disk_bytes=self.disk_mb * 1024 * 1024, uid=uid)
            if budget is not None:
                argv = ["/bin/sh", "-c", _ENTER_CGROUP, "appo-sandbox", *budget.procs_files, "--", *argv]
            output, stop, returncode, errors = self._execute(argv, {"PATH": "/usr/bin:/bin"},
                                                             pass_fds=(code_fd, seccomp_fd, lifeline), cwd="/",
                                                             end_sandbox=ends.close)
            ends.close()  # the sandbox's init exits (if it has not), and with it every process it holds
            if stop is not None and budget is None and uid is not None:
                _wait_until_uid_has_no_process(uid)  # before the uid is leased again
            oom = budget is not None and budget.oom_killed()
        return output, stop or self._exit_status(returncode, errors, oom)

    def _run_unconfined(self, code: str) -> tuple[bytes, str | None]:
        workdir = tempfile.mkdtemp(prefix="appo_unconfined_")
        try:
            code_path = os.path.join(workdir, ".appo_code.py")
            with open(code_path, "w", encoding="utf-8", errors="surrogateescape") as file:
                file.write(code)
            config = {"limits": self._limits(), "code_path": code_path, "workdir": workdir, "audit_hook": True,
                      "site": list(site_packages())}
            argv = [sys.executable, "-I", "-S", "-B", CHILD_SCRIPT, json.dumps(config)]
            output, stop, returncode, errors = self._execute(argv, sandbox_environment(workdir), cwd=workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return output, stop or self._exit_status(returncode, errors, False)

    def _execute(self, argv: list[str], env: dict, pass_fds=(), cwd: str = "/", end_sandbox=None):
        """Start ``argv`` in its own session; collect capped stdout until exit or the deadline, then end it:
        ``end_sandbox()`` first when given (the sandbox's init exits and bubblewrap reaps it: no zombie is left
        to the host's init), SIGKILL to the process group if it is still there a second later (or at once).

        Returns (stdout bytes, stop reason or None, exit code, the sandbox's own stderr text)."""
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, start_new_session=True, pass_fds=pass_fds)
        try:
            output, stop = self._collect(proc, start + self.timeout_s)
        finally:
            if proc.poll() is None and end_sandbox is not None:
                end_sandbox()
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                _kill_group(proc)
            proc.wait()
            os.set_blocking(proc.stderr.fileno(), False)
            try:
                errors = (proc.stderr.read(65536) or b"").decode(errors="replace").strip()
            except BlockingIOError:
                errors = ""
            proc.stdout.close()
            proc.stderr.close()
        return output, stop, proc.returncode, errors

    def _collect(self, proc: subprocess.Popen, deadline: float) -> tuple[bytes, str | None]:
        """Read stdout incrementally; stop at EOF, at the deadline or when the capture cap is passed."""
        chunks, size = [], 0
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            exited_at = None
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return b"".join(chunks), f"TimeoutError: execution exceeded {self.timeout_s:g} s (killed)"
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.2:  # leftovers hold the pipe open
                    return b"".join(chunks), None
                if not selector.select(timeout=min(0.05, deadline - now)):
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    return b"".join(chunks), None
                chunks.append(data)
                size += len(data)
                if size > self.max_capture_bytes:
                    kept = b"".join(chunks)[: self.max_capture_bytes]
                    return kept, f"OutputLimitError: output exceeded {self.max_capture_bytes} bytes (stopped)"

    def _exit_status(self, returncode: int, errors: str, oom: bool) -> str | None:
        """Map the sandbox's exit status (128 + signal for a signalled process) to a status line."""
        if oom:
            return f"MemoryError: the sandbox used up its memory budget of {self.memory_mb} MiB (killed)"
        if returncode == _SETUP_FAILED_EXIT or (returncode != 0 and errors):
            detail = f": {errors.splitlines()[-1]}" if errors else ""
            return f"SandboxError: the sandbox could not be set up{detail}; the code was not run"
        if returncode in (0, 1):  # 1: an exception, whose traceback is already in the output
            return None
        signum = returncode - 128 if returncode > 128 else -returncode if returncode < 0 else 0
        if signum == signal.SIGXCPU:
            return f"TimeoutError: CPU time limit of {self.cpu_time_s} s exceeded (killed)"
        if signum == signal.SIGKILL:
            return f"Killed by signal SIGKILL (CPU time limit of {self.cpu_time_s} s or memory limit)"
        if 0 < signum < signal.NSIG:
            return (f"Killed by signal {signal.Signals(signum).name} "
                    f"(possibly the memory limit of {self.memory_mb} MiB)")
        return f"Process exited with status {returncode}"

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


class _Closing:
    """A file descriptor closed by ``close()`` or at the end of the ``with`` block, whichever comes first."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until_uid_has_no_process(uid: int, timeout_s: float = 2.0) -> None:
    """Wait (bounded) until no process of ``uid`` is left: the PID namespace empties asynchronously after its
    first process is killed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and uid in uids_with_processes():
        time.sleep(0.01)
