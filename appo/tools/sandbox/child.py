"""The interpreter side of the Python sandbox: this file runs as a script inside the sandbox.

It imports nothing from appo (inside the sandbox appo is not in view). ``python -I -S -B child.py CONFIG``:
CONFIG is a Python literal (a dict) with "code_path" (the code to run), "workdir" (the working directory),
"site" (the parent's site-packages folders, put on sys.path: -S skips site.py), "limits" (resource name ->
value, applied to the worker only), "audit_hook" (true only when the sandbox is unconfined), "status" (a file
descriptor: the write end of the pipe on which the parent learns how the call went) and "lifeline" (a file
descriptor, or None: the read end of a pipe whose write end only the parent holds).

Process layout: this process stays as a small init (PID 1 of the sandbox's PID namespace when confined). It
first makes itself non-dumpable, so that no other process of the call (same uid, no capability) can open its
/proc/<pid>/mem, fd or environ; the worker and everything it forks inherit that, and the seccomp filter
refuses to undo it (a program the code execs is dumpable again, as the kernel resets it on exec: then only
the code's own processes can reach it). It forks one worker that applies the limits and runs the code,
reaps every orphan reparented to it, and exits when the worker does (every process left in the namespace
dies with it), or when the lifeline reads end-of-file, i.e. when the parent closed it or died, even by
SIGKILL (a parent-death signal would not do: the kernel clears it when the uid changes).

The status pipe carries one line per event, written only by code of this file: "running" (the worker is
about to run the code), "setup-failed <reason>", "exit <code>", "signal <number>", "orphaned", "lost" (no
child left to wait for: cannot happen while the worker lives). The worker closes its end before the code
runs and init is out of the code's reach, so model code cannot write on it; its exit code and its output are
its own, and the parent never reads a status from them.
"""

import os
import sys

import _ast  # the parser's node types without the ast module's imports (~5 ms of CPU per call)

SETUP_FAILED_EXIT = 121
PR_SET_DUMPABLE = 4
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PROCESS_EVENTS = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
                   "os.fork", "os.forkpty")
_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.chmod",
                 "os.chown", "os.truncate", "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree",
                 "shutil.copyfile", "shutil.move", "os.setxattr", "os.removexattr")


def main() -> None:
    os.dup2(1, 2)  # the code's stderr joins its stdout; the sandbox's own errors went to the old fd 2
    status = None
    try:
        config = eval(sys.argv[1], {"__builtins__": {}})  # the parent's repr of literals, never model text
        status = config["status"]
        _make_undumpable()
        with open(config["code_path"], encoding="utf-8", errors="surrogateescape") as file:
            code = file.read()
        os.chdir(config["workdir"])
        lifeline = config.get("lifeline")
        wakeup = _watch_children() if lifeline is not None else None
        worker = os.fork()
    except Exception as error:  # noqa: BLE001 - any failure here means the code was not run
        _report(status, f"setup-failed {type(error).__name__}: {error}")
        os._exit(SETUP_FAILED_EXIT)
    if worker == 0:
        try:
            if lifeline is not None:
                _unwatch_children(lifeline, wakeup)
            _apply_limits(config["limits"])
            if config["audit_hook"]:
                sys.addaudithook(_make_audit_hook(os.path.realpath(config["workdir"])))
        except Exception as error:  # noqa: BLE001
            _report(status, f"setup-failed {type(error).__name__}: {error}")
            os._exit(SETUP_FAILED_EXIT)
        _report(status, "running")
        if status is not None:
            os.close(status)  # from here on nothing the code can reach writes a status
        os._exit(_run_user_code(code, config.get("site", [])))
    if lifeline is None:
        event = _reap_until(worker)
    else:
        event = _reap_until_or_orphaned(worker, lifeline, wakeup)
    _report(status, event)
    kind, _, value = event.partition(" ")
    os._exit(int(value) if kind == "exit" else 128 + int(value) if kind == "signal" else 137)


def _report(status: int | None, line: str) -> None:
    if status is not None:
        os.write(status, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def _make_undumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0) for this process and, through fork, for every process of the call."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _apply_limits(limits: dict) -> None:
    import resource
    for name, value in limits.items():
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU at the soft limit, SIGKILL at the hard
        resource.setrlimit(getattr(resource, name), (value, hard))


def _event(status: int) -> str:
    """The worker's wait status as a status line: "exit <code>" or "signal <number>"."""
    return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"


def _reap_until(worker: int) -> str:
    """Reap children (the worker and any orphan) until the worker exits -> its status line."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return "lost"
        except InterruptedError:
            continue
        if pid == worker:
            return _event(status)


def _watch_children() -> int:
    """SIGCHLD writes to a pipe (returned: its read end): one select() waits for children and the lifeline.
    (``_signal``: the signal module without its enum wrappers, ~4 ms of CPU per call.)"""
    import _signal
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    _signal.set_wakeup_fd(write_end)
    _signal.signal(_signal.SIGCHLD, lambda *args: None)
    return read_end


def _unwatch_children(lifeline: int, wakeup: int) -> None:
    import _signal
    os.close(_signal.set_wakeup_fd(-1))
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    for fd in (lifeline, wakeup):
        os.close(fd)


def _reap_until_or_orphaned(worker: int, lifeline: int, wakeup: int) -> str:
    """Like _reap_until, but "orphaned" as soon as the lifeline reads end-of-file."""
    import select
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return "lost"
            if pid == 0:
                break
            if pid == worker:
                return _event(status)
        try:
            readable, _, _ = select.select([lifeline, wakeup], [], [])
        except InterruptedError:
            continue
        if lifeline in readable:
            return "orphaned"  # the parent is gone or gave up on this call
        try:
            os.read(wakeup, 4096)
        except BlockingIOError:
            pass


def _make_audit_hook(workdir: str):
    """Only for the unconfined mode: refuse network, process creation and writes outside ``workdir``.

    Python code can remove it (ctypes); it is a courtesy layer, not confinement."""
    allowed = workdir + os.sep

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == workdir or real.startswith(allowed) or real == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event.startswith("socket."):
            raise PermissionError("network access is disabled in the sandbox")
        if event.startswith(_PROCESS_EVENTS):
            raise PermissionError("starting processes is disabled in the unconfined sandbox")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & _WRITE_FLAGS)
            if path is not None and writes and not inside(path):
                raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
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


def _run_user_code(code: str, site_packages: list) -> int:
    """Run ``code`` as __main__; print the last expression's repr if nothing was printed -> exit code.
    linecache and traceback (~10 ms of CPU to import) are loaded only to format an exception, so the code's
    source lines are known to tracebacks, not to ``inspect.getsource`` while it runs."""
    sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
    sys.stderr.reconfigure(line_buffering=True, errors="backslashreplace")
    filename = "<code>"
    sys.stdout = tracker = _TrackingStream(sys.stdout)
    sys.path += [p for p in site_packages if p not in sys.path]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(_ast.Expression(last.value), filename, "eval"), namespace)
            if value is not None and not tracker.written:
                print(repr(value))
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # noqa: BLE001 - report everything, including MemoryError
        namespace.clear()  # free what the code allocated (a memory bomb) before formatting the traceback
        sys.stdout.flush()
        import linecache
        import traceback
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        frames = traceback.extract_tb(error.__traceback__)
        user_frames = [f for f in frames if f.filename != __file__]
        lines = ["Traceback (most recent call last):\n"] if user_frames else []
        lines += traceback.format_list(user_frames[-3:]) + traceback.format_exception_only(type(error), error)
        sys.stderr.write("".join(lines))
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    main()
