"""A Python tool that runs model-written code in a locked-down child process.

Semantics for the model: the code runs like a script; if it prints nothing and its last statement is an
expression, that expression's ``repr`` is printed (as in a REPL), so ``<python>2+3</python>`` gives ``5``.
The result is the merged stdout+stderr (errors as the last lines of the traceback), followed by a status
line when something went wrong ("TimeoutError: ... exceeded 5 s", "MemoryError", "Killed by signal ...").

Layers of confinement, outermost first:
  parent   - start_new_session=True; the whole process group is SIGKILLed on the wall-clock deadline or when
             the output passes ``max_capture_bytes``; output is read incrementally (no unbounded buffer);
             a private temporary directory is the child's cwd, HOME and TMPDIR and is removed afterwards.
  kernel   - (when the parent is root) new network namespace (no interface is up: every connect fails), new
             PID namespace (when the code's first process exits or is killed, every process it forked dies),
             new mount namespace in which the world-writable directories (``_SHARED_WRITABLE`` and the
             sandbox's parent) are bind-mounted read-only, all but the sandbox directory itself;
             rlimits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (processes), RLIMIT_FSIZE, RLIMIT_NOFILE,
             RLIMIT_CORE = 0; privileges dropped to an unprivileged uid/gid, so RLIMIT_NPROC is enforced (the
             kernel does not enforce it for root) and root-owned files are read-only. By default each running
             sandbox gets its own uid from ``SANDBOX_UIDS`` (no passwd entry needed), so RLIMIT_NPROC counts
             that sandbox's processes only; ``uid=65534`` (nobody) makes all sandboxes share one budget.
  Python   - an audit hook refuses socket use, process launching (exec, spawn, system, subprocess) and every
             file-system write outside the sandbox directory (open for writing, mkdir, rename, remove, ...).
When the interpreter's own files are not readable by others (this machine keeps Python under /root, mode 700),
the child keeps the single capability CAP_DAC_READ_SEARCH (read any file, write none) so that imports work.
Known gaps: the audit hook is bypassable by ctypes; what then remains are the kernel layers (a world-writable
directory outside the list, or a world-writable file, would still be writable: this machine has none). Without
root there are no namespaces and no uid change, only rlimits and the audit hook.
"""

from __future__ import annotations

import ast
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

from appo.tools.base import Tool

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SANDBOX_UIDS = range(900_000, 901_024)  # uid = gid; one per concurrently running sandbox of this process
_CODE_FILE = ".appo_code.py"  # written by the parent, read and removed by the child before the code runs
_SETUP_FAILED_EXIT = 121  # the child could not build its sandbox: it refused to run the code


class PythonTool(Tool):
    """Run Python code in a sandboxed subprocess; ``run`` returns the output string and never raises.

    timeout_s: wall-clock limit (the process group is killed at the deadline); cpu_time_s: RLIMIT_CPU
    (default: the wall limit rounded up, plus 1 s); memory_mb: RLIMIT_AS; max_processes: the processes and
    threads the code may add (RLIMIT_NPROC is this plus 2 for the sandbox's own); max_file_mb: RLIMIT_FSIZE;
    max_open_files: RLIMIT_NOFILE; max_capture_bytes: stdout+stderr beyond this stops the process;
    max_code_chars: longer code is refused; uid/gid: a fixed unprivileged identity used when the parent is root (None: one from
    ``SANDBOX_UIDS`` per call; two processes that both run sandboxes may then share a uid, and so a budget).
    """

    name = "python"
    tag = "python"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, cpu_time_s: int | None = None,
                 max_processes: int = 16, max_file_mb: int = 16, max_open_files: int = 64,
                 max_output_chars: int = 1024, max_capture_bytes: int = 65536, max_code_chars: int = 100_000,
                 uid: int | None = None, gid: int | None = None):
        for arg, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb),
                           ("max_processes", max_processes),
                           ("max_file_mb", max_file_mb), ("max_open_files", max_open_files),
                           ("max_output_chars", max_output_chars), ("max_capture_bytes", max_capture_bytes),
                           ("max_code_chars", max_code_chars)):
            if not value > 0:
                raise ValueError(f"{arg}: must be positive, got {value!r}")
        if memory_mb < 64:
            raise ValueError(f"memory_mb: the interpreter alone needs about 40 MiB, got {memory_mb}")
        if cpu_time_s is not None and cpu_time_s <= 0:
            raise ValueError(f"cpu_time_s: must be positive, got {cpu_time_s!r}")
        self.timeout_s = float(timeout_s)
        self.cpu_time_s = int(cpu_time_s) if cpu_time_s is not None else int(-(-timeout_s // 1)) + 1
        self.memory_mb = int(memory_mb)
        self.max_processes = int(max_processes)
        self.max_file_mb = int(max_file_mb)
        self.max_open_files = int(max_open_files)
        self.max_output_chars = int(max_output_chars)
        self.max_capture_bytes = int(max_capture_bytes)
        self.max_code_chars = int(max_code_chars)
        if (uid is None) != (gid is None) or (uid is not None and (uid <= 0 or gid <= 0)):
            raise ValueError(f"uid, gid: give both (positive, not root) or neither, got {uid}, {gid}")
        self.uid, self.gid = uid, gid

    def run(self, text: str) -> str:
        """Execute ``text`` as a Python script in a fresh sandbox; output plus a status line if any."""
        try:
            return self._run(text)
        except Exception as error:  # the tool contract: never raise into the rollout loop
            return f"SandboxError: {type(error).__name__}: {error}"

    def _run(self, text: str) -> str:
        code = textwrap.dedent(text).strip("\n")
        if len(code) > self.max_code_chars:
            return f"Error: code is {len(code)} characters; the limit is {self.max_code_chars}"
        as_root = os.geteuid() == 0
        identity = None
        if as_root:
            identity = (self.uid, self.gid) if self.uid is not None else (_UID_POOL.acquire(),) * 2
        workdir = tempfile.mkdtemp(prefix="appo_sandbox_")
        try:
            if identity is not None:
                os.chown(workdir, *identity)
            output, status = self._execute(code, workdir, self._child_config(workdir, identity))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if identity is not None and self.uid is None:
                _UID_POOL.release(identity[0])
        return self._format(output, status)

    def _child_config(self, workdir: str, identity: tuple[int, int] | None) -> dict:
        mib = 1024 * 1024
        as_root = identity is not None
        return {"workdir": workdir, "drop_to": list(identity) if as_root else None,
                "keep_read_cap": as_root and not _readable_by_others(os.path.dirname(os.__file__)),
                "limits": {"RLIMIT_AS": self.memory_mb * mib, "RLIMIT_CPU": self.cpu_time_s,
                           "RLIMIT_NPROC": self.max_processes + 2, "RLIMIT_FSIZE": self.max_file_mb * mib,
                           "RLIMIT_NOFILE": self.max_open_files, "RLIMIT_CORE": 0}}

    def _execute(self, code: str, workdir: str, config: dict) -> tuple[bytes, str | None]:
        """Start the child, feed it the code, collect capped output until exit or deadline.

        Returns (output bytes, status line or None)."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        # -S skips site's .pth processing (a good part of the start-up time); the child adds the site-packages
        # folders to sys.path itself before running the code, so installed packages stay importable.
        launcher = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
                    "from appo.tools.python_sandbox import _child_main; _child_main()")
        with open(os.path.join(workdir, _CODE_FILE), "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write(code)  # a file, not stdin: a pipe write could block on a child that does not read
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", launcher, json.dumps(config)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=workdir, env=env, start_new_session=True, close_fds=True)
        try:
            output, stop_reason = self._collect(proc, start + self.timeout_s)
        finally:
            _kill_group(proc)
            proc.wait()
            proc.stdout.close()
        return output, stop_reason or self._exit_status(proc.returncode)

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

    def _exit_status(self, returncode: int) -> str | None:
        """Map the child's exit status (128 + signal for a signalled process) to a status line."""
        if returncode == 0 or returncode == 1:  # 1: an exception, whose traceback is already in the output
            return None
        if returncode == _SETUP_FAILED_EXIT:
            return "SandboxError: the sandbox could not be set up; the code was not run"
        signum = returncode - 128 if returncode > 128 else -returncode if returncode < 0 else 0
        if signum == signal.SIGXCPU:
            return f"TimeoutError: CPU time limit of {self.cpu_time_s} s exceeded (killed)"
        if signum == signal.SIGKILL:
            return f"Killed by signal SIGKILL (CPU time limit of {self.cpu_time_s} s or memory limit)"
        if signum > 0:
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


class _UidPool:
    """Hands out distinct uids from SANDBOX_UIDS to concurrent calls (thread-safe)."""

    def __init__(self, uids: range):
        self._free, self._lock = list(reversed(uids)), threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("all sandbox uids are in use")
            return self._free.pop()

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)


_UID_POOL = _UidPool(SANDBOX_UIDS)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _readable_by_others(path: str) -> bool:
    """True when a user with no special permission can traverse to ``path`` and read it (mode bits only)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for depth in range(1, len(parts) + 1):
        prefix = os.sep.join(parts[:depth]) or os.sep
        if not os.stat(prefix).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


# ----------------------------------------------------------------------------------------------------------
# Child side: everything below runs in the sandboxed interpreter (started by ``_execute``).
# ----------------------------------------------------------------------------------------------------------

_CLONE_NEWNET, _CLONE_NEWPID, _CLONE_NEWNS = 0x40000000, 0x20000000, 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
_SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
_CAP_DAC_READ_SEARCH = 2
_PR_SET_KEEPCAPS = 8
_PROCESS_EVENTS = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
                   "os.startfile")
_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.chmod",
                 "os.chown", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
                 "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move",
                 "os.setxattr", "os.removexattr")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _child_main() -> None:
    """Entry point of the sandboxed interpreter: read code, enter namespaces, confine, run in a grandchild.

    Process chain: this bootstrap (root; it enters the new network and mount namespaces itself) -> a keeper
    (PID 1 of the new PID namespace, confined) -> the worker that runs the code (confined; not PID 1, so
    signals such as SIGXCPU act on it normally). Each exits with the next one's status (128 + signal number
    for a signalled process). Any failure to build the sandbox exits with _SETUP_FAILED_EXIT, code not run.
    """
    config = json.loads(sys.argv[1])
    code_path = os.path.join(config["workdir"], _CODE_FILE)
    with open(code_path, encoding="utf-8", errors="surrogateescape") as file:
        code = file.read()
    os.remove(code_path)
    try:
        if config["drop_to"] is not None and _unshare_namespaces():
            _make_shared_directories_read_only(config["workdir"])
        _wait_for_child_and_exit_if_parent()  # the keeper continues
        _confine(config)
        _wait_for_child_and_exit_if_parent()  # the worker continues
    except Exception as error:
        os.write(2, f"SandboxError: {type(error).__name__}: {error}\n".encode())
        os._exit(_SETUP_FAILED_EXIT)
    os._exit(_run_user_code(code))


def _wait_for_child_and_exit_if_parent() -> None:
    """Fork; the parent waits for the child and exits with its status; the child returns."""
    pid = os.fork()
    if pid == 0:
        return
    _, status = os.waitpid(pid, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _unshare_namespaces() -> bool:
    """New network, PID (for the children) and mount namespaces; False where the kernel refuses, and then
    the remaining layers still apply."""
    return _libc().unshare(_CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWNS) == 0


def _make_shared_directories_read_only(workdir: str) -> None:
    """In this (new, private) mount namespace: bind the sandbox directory onto itself, then cover each
    world-writable directory with a read-only recursive bind of itself; the sandbox's own mount stays
    writable. Mount propagation is made private first, so nothing reaches the parent's namespace."""
    libc = _libc()
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError("could not make the mount namespace private")
    workdir_bytes = os.fsencode(workdir)
    if libc.mount(workdir_bytes, workdir_bytes, None, _MS_BIND, None) != 0:
        raise OSError("could not bind the sandbox directory")
    for directory in dict.fromkeys((*_SHARED_WRITABLE, os.path.dirname(workdir))):
        if not os.path.isdir(directory) or os.path.islink(directory):
            continue
        path = os.fsencode(directory)
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
        if libc.mount(path, path, None, _MS_BIND | _MS_REC, None) != 0 or \
                libc.mount(None, path, None, flags, None) != 0:
            raise OSError(f"could not make {directory} read-only")


def _confine(config: dict) -> None:
    """Apply rlimits, drop privileges (fail closed), then install the audit hook."""
    import resource
    os.chdir(config["workdir"])
    for name, value in config["limits"].items():
        limit = getattr(resource, name)
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU at the soft limit, SIGKILL at hard
        resource.setrlimit(limit, (value, hard))
    if config["drop_to"] is not None:
        uid, gid = config["drop_to"]
        libc = _libc()
        if config["keep_read_cap"] and libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            raise OSError("prctl(PR_SET_KEEPCAPS) failed")
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if config["keep_read_cap"]:
            _set_capabilities(libc, 1 << _CAP_DAC_READ_SEARCH)
        if os.getuid() == 0 or os.geteuid() == 0:
            raise OSError("privileges were not dropped")
    sys.addaudithook(_make_audit_hook(os.path.realpath(config["workdir"])))


def _set_capabilities(libc, mask: int) -> None:
    """capset(): effective = permitted = ``mask`` (lower 32 capability bits), inheritable = 0."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)(Data(mask, mask, 0), Data(0, 0, 0))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _make_audit_hook(workdir: str):
    """Refuse network, process launching and file-system writes outside ``workdir`` (realpath)."""
    allowed_roots = (workdir + os.sep, )

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd: it was opened (and checked) before
        path = os.fsdecode(path)
        if path == os.devnull:
            return True
        real = os.path.realpath(path)
        return real == workdir or real.startswith(allowed_roots)

    def hook(event: str, args: tuple) -> None:
        if event.startswith("socket."):
            raise PermissionError("network access is disabled in the sandbox")
        if event.startswith(_PROCESS_EVENTS):
            raise PermissionError("starting programs is disabled in the sandbox")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & _WRITE_FLAGS)
            if path is None or inside(path):
                return
            if writes:
                raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
            if os.path.isdir(path):  # a directory fd would allow writes through dir_fd= arguments
                raise PermissionError(f"opening a directory outside the sandbox is not allowed: {path!r}")
        elif event in _WRITE_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"{event} outside the sandbox directory is not allowed: {arg!r}")

    return hook


class _TrackingStream:
    """Wraps sys.stdout and remembers whether anything was written."""

    def __init__(self, stream):
        self._stream, self.written = stream, False

    def write(self, text):
        self.written = self.written or bool(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _run_user_code(code: str) -> int:
    """Run ``code`` as __main__; print the last expression's repr if nothing was printed -> exit code."""
    import linecache
    import traceback
    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
    sys.stderr.reconfigure(line_buffering=True, errors="backslashreplace")
    filename = "<code>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    sys.stdout = tracker = _TrackingStream(sys.stdout)
    import site
    sys.path += [p for p in site.getsitepackages() if p not in sys.path]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
            if value is not None and not tracker.written:
                print(repr(value))
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # noqa: BLE001 - report everything, including MemoryError
        namespace.clear()  # free what the code allocated (a memory bomb) before formatting the traceback
        sys.stdout.flush()
        frames = traceback.extract_tb(error.__traceback__)
        user_frames = [f for f in frames if f.filename != __file__]
        lines = ["Traceback (most recent call last):\n"] if user_frames else []
        lines += traceback.format_list(user_frames[-3:]) + traceback.format_exception_only(type(error), error)
        sys.stderr.write("".join(lines))
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
