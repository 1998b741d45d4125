"""The parent's side of one sandbox call: start it, watch it, end it, and report only what this process saw.

``Supervisor`` starts bubblewrap (or, unconfined, the bare interpreter) in a new session, learns which
process is the sandbox's init (bubblewrap's ``--info-fd``) and holds a pidfd on it, collects stdout until
end-of-file, the wall-clock deadline, the output cap or the CPU budget, then ends the call:

  1. SIGKILL to the sandbox's init through its pidfd (taken while init was bubblewrap's child, so the signal
     cannot reach a process that later reused the pid). Init is PID 1 of the call's PID namespace: when it
     dies the kernel kills every process left in the namespace (daemons, new sessions, ignored signals and
     forks in flight included), and init's exit completes only once they are all gone.
  2. bubblewrap, which sandboxed code can neither see nor signal, reaps init and exits; this process reaps
     bubblewrap, then waits on init's pidfd until init is gone. Had bubblewrap died first, init would be
     reparented to this process where it is a subreaper (or PID 1): it is then reaped here through its
     pidfd, so no zombie is left to hold the call's uid.

None of this depends on a cgroup, on what the code did, or on who reaps orphans in this process's tree.

The call's status comes from this process's own observations: its clock (deadline), its byte count (cap),
its CPU meter (budget), bubblewrap's exit, and the lines the sandbox's init writes on a status pipe that
model code never holds (see child.py). Model code's exit code and output are only reported, never trusted.

CPU meter: a cgroup's counter when the call has one (``CgroupBudget.cpu_seconds``), else ``tree_cpu_seconds``
over /proc (each process's own time plus the time of the children it reaped; a child whose parent ignores
SIGCHLD is reaped by the kernel without a trace, so that count can run short, never long). The final figure
is bubblewrap's children's time, read from its zombie before it is reaped.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass
class Outcome:
    """output: stdout (capped); stop: "timeout", "output" or "cpu" when this process stopped the call, else
    None; events: the init's status lines ([] when it never started); cpu_s: CPU seconds the call used (None
    when not measured); errors: the sandbox's own stderr (bubblewrap's messages); returncode: bubblewrap's;
    clean: every process of the call was gone when ``end`` returned without having to kill bubblewrap."""

    output: bytes
    stop: str | None
    events: list[str] = field(default_factory=list)
    cpu_s: float | None = None
    errors: str = ""
    returncode: int | None = None
    clean: bool = True


def process_stats() -> dict[int, list[bytes]]:
    """{pid: the fields of /proc/<pid>/stat after the command name (state, ppid, ..., utime at [11])} of every
    process this process can see; one that exits while the table is read is left out."""
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                stats[int(name)] = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
    return stats


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of process ``root`` and every process below it, from /proc/<pid>/stat:
    each one's own time plus the time of the children it has reaped. 0.0 when ``root`` is gone."""
    ticks, children = {}, {}
    for pid, fields in process_stats().items():
        ticks[pid] = sum(int(f) for f in fields[11:15])
        children.setdefault(int(fields[1]), []).append(pid)
    total, frontier, seen = 0, [root], set()
    while frontier:
        pid = frontier.pop()
        if pid not in seen and pid in ticks:
            seen.add(pid)
            total += ticks[pid]
            frontier.extend(children.get(pid, ()))
    return total * _TICK_S


class Supervisor:
    """One sandbox call, started at construction. ``run`` collects and ends it -> ``Outcome``.

    argv / env / cwd: what to start (in a new session); pass_fds: descriptors it inherits; info_fd: the read
    end of bubblewrap's ``--info-fd`` pipe (None: unconfined, no init to watch); status_fd: the read end of
    the init's status pipe; close_after_start: descriptors of this process to close once the child holds them.
    """

    def __init__(self, argv: list[str], env: dict, *, pass_fds=(), info_fd: int | None, status_fd: int,
                 close_after_start=(), cwd: str = "/"):
        self.status_fd, self.info_fd = status_fd, info_fd
        self.init_pid: int | None = None
        self._init_pidfd: int | None = None
        self._cpu_seen = 0.0
        self.start = time.monotonic()
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True,
                                         pass_fds=pass_fds)
        finally:
            for fd in close_after_start:
                os.close(fd)

    def run(self, *, timeout_s: float, capture_bytes: int, cpu_limit_s: float, cpu_meter=None,
            cpu_poll_s: float = 0.1) -> Outcome:
        """Watch the call until it ends or is stopped, end it, and return what was seen.

        cpu_meter: ``f(init_pid) -> CPU seconds so far`` read every ``cpu_poll_s`` (None: no budget check
        while the call runs)."""
        deadline = self.start + timeout_s
        try:
            if self.info_fd is not None:
                self._attach(deadline)
            output, stop = self._collect(deadline, capture_bytes, cpu_limit_s, cpu_meter, cpu_poll_s)
        except BaseException:
            self.end()
            raise
        outcome = self.end()
        outcome.output, outcome.stop = output, stop
        return outcome

    # ------------------------------------------------------------------ the sandbox's init
    def _attach(self, deadline: float) -> None:
        """Read init's pid from bubblewrap's info pipe (written right after the clone) and take a pidfd on it
        while it is still bubblewrap's child. Leaves init_pid None when bubblewrap failed before the clone."""
        data = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.info_fd, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                chunk = os.read(self.info_fd, 4096)
                if not chunk:
                    break
                data += chunk
        try:
            pid = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError):
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:  # no pidfd on this kernel: signal by pid, checking the parent first
            pidfd = None
        if _parent_of(pid) != self.proc.pid:  # init already gone and the pid reused
            if pidfd is not None:
                os.close(pidfd)
            return
        self.init_pid, self._init_pidfd = pid, pidfd

    def _kill_init(self) -> None:
        try:
            if self._init_pidfd is not None:
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
            elif self.init_pid is not None and _parent_of(self.init_pid) == self.proc.pid:
                os.kill(self.init_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _init_gone(self, timeout_s: float) -> bool:
        """Wait (bounded) until init has exited, which the kernel signals once its namespace is empty; reap it
        if it was reparented to this process (a subreaper, or PID 1) because bubblewrap died first."""
        if self._init_pidfd is None:
            return True
        readable, _, _ = select.select([self._init_pidfd], [], [], timeout_s)
        if not readable:
            return False
        try:
            os.waitid(os.P_PIDFD, self._init_pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:  # bubblewrap's child, reaped by bubblewrap, as it should be
            pass
        return True

    # ------------------------------------------------------------------ collecting
    def _collect(self, deadline, capture_bytes, cpu_limit_s, cpu_meter, cpu_poll_s):
        """Read stdout incrementally; stop at EOF, at the deadline, past the capture cap or the CPU budget."""
        chunks, size = [], 0
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        next_cpu_check = self.start + cpu_poll_s
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            exited_at = None
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return b"".join(chunks), "timeout"
                wait_s = min(0.05, deadline - now)
                if cpu_meter is not None and self.init_pid is not None:
                    if now >= next_cpu_check:
                        next_cpu_check = now + cpu_poll_s
                        self._cpu_seen = max(self._cpu_seen, cpu_meter(self.init_pid))
                        if self._cpu_seen >= cpu_limit_s:
                            return b"".join(chunks), "cpu"
                    wait_s = min(wait_s, next_cpu_check - now)
                if exited_at is None and self.proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.2:  # something else holds the pipe open
                    return b"".join(chunks), None
                if not selector.select(timeout=max(0.0, wait_s)):
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    return b"".join(chunks), None
                chunks.append(data)
                size += len(data)
                if size > capture_bytes:
                    return b"".join(chunks)[:capture_bytes], "output"

    # ------------------------------------------------------------------ ending
    def end(self, timeout_s: float = 2.0) -> Outcome:
        """End the call (idempotent) and reap it: init SIGKILLed (the namespace empties with it), bubblewrap
        waited for; killed with its session only if it has not exited ``timeout_s`` later."""
        proc = self.proc
        self._kill_init()
        if self.info_fd is None and proc.poll() is None:  # unconfined: no namespace, the session it is
            _kill_group(proc)
        clean = _wait_for_zombie(proc.pid, timeout_s)
        if not clean:
            _kill_group(proc)
            _wait_for_zombie(proc.pid, timeout_s)
        cpu_s = max(_total_cpu_seconds(proc.pid) or 0.0, self._cpu_seen)
        proc.wait()
        clean = self._init_gone(timeout_s) and clean
        if self._init_pidfd is not None:
            os.close(self._init_pidfd)
            self._init_pidfd = None
        outcome = Outcome(b"", None, events=_read_lines(self.status_fd), cpu_s=cpu_s,
                          errors=_read_stderr(proc), returncode=proc.returncode, clean=clean)
        proc.stdout.close()
        proc.stderr.close()
        return outcome


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return int(file.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _wait_for_zombie(pid: int, timeout_s: float) -> bool:
    """Wait (bounded) until child ``pid`` has exited, without reaping it -> True when it has."""
    deadline, pause = time.monotonic() + timeout_s, 0.0002
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:  # reaped by someone else already
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def _total_cpu_seconds(pid: int) -> float | None:
    """The CPU time of zombie ``pid`` and of the descendants it reaped (utime + stime + cutime + cstime)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) * _TICK_S
    except (OSError, IndexError, ValueError):
        return None


def _read_lines(fd: int) -> list[str]:
    """Everything on the status pipe now (its writers are gone or done), as lines."""
    data = b""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").splitlines()


def _read_stderr(proc: subprocess.Popen) -> str:
    os.set_blocking(proc.stderr.fileno(), False)
    try:
        return (proc.stderr.read(65536) or b"").decode(errors="replace").strip()
    except BlockingIOError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
