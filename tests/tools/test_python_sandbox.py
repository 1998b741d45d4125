"""The Python sandbox holds against hostile code and still runs normal code like a script."""

import os
import socket
import time
import uuid

import pytest

from appo.tools.python_sandbox import SANDBOX_UIDS, PythonTool

LIMIT_S = 2.0
AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def tool():
    return PythonTool(timeout_s=LIMIT_S, max_processes=8)


def timed_run(tool, code):
    start = time.monotonic()
    result = tool.run(code)
    elapsed = time.monotonic() - start
    assert elapsed < 2 * tool.timeout_s, f"took {elapsed:.2f} s: {result!r}"
    return result


def test_prints_and_last_expression_value(tool):
    assert timed_run(tool, "print('hello')\nprint(6 * 7)") == "hello\n42"
    assert timed_run(tool, "2 + 3") == "5"
    assert timed_run(tool, "x = 'ab'\nx * 2") == "'abab'"  # repr, as in a REPL
    assert timed_run(tool, "print('shown')\n99") == "shown"  # the value only when nothing was printed
    assert timed_run(tool, "x = 1") == "(no output)"


def test_imports_and_indented_body(tool):
    code = """
        import math
        from fractions import Fraction
        print(math.comb(10, 3), Fraction(3, 4) + Fraction(1, 6))
    """
    assert timed_run(tool, code) == "120 11/12"


def test_long_code_runs_and_input_gets_eof(tool):
    assert timed_run(tool, "text = '" + "y" * 90_000 + "'\nlen(text)") == "90000"  # more than a pipe holds
    assert timed_run(tool, "input()").splitlines()[-1] == "EOFError: EOF when reading a line"
    assert tool.run("x = 1\n" * 20_000).startswith("Error: code is 119999 characters; the limit is 100000")


def test_exception_gives_last_traceback_lines(tool):
    result = timed_run(tool, "def f(x):\n    return 1 / x\nprint('before')\nf(0)")
    lines = result.splitlines()
    assert lines[0] == "before"
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert 'File "<code>", line 2, in f' in result
    assert "python_sandbox" not in result  # the sandbox's own frames are hidden


def test_infinite_loop_is_killed_at_the_wall_clock_limit(tool):
    start = time.monotonic()
    result = timed_run(tool, "print('started')\nwhile True:\n    pass")
    assert time.monotonic() - start >= LIMIT_S * 0.95
    assert result.splitlines() == ["started", "TimeoutError: execution exceeded 2 s (killed)"]


def test_cpu_limit_applies_when_the_wall_clock_is_longer():
    tool = PythonTool(timeout_s=6.0, cpu_time_s=1)
    start = time.monotonic()
    result = tool.run("while True:\n    pass")
    assert time.monotonic() - start < 4.0
    assert "CPU time limit of 1 s exceeded" in result


def test_memory_bomb_gives_memory_error():
    tool = PythonTool(timeout_s=LIMIT_S, memory_mb=160)  # a small limit: filling it is quick even under load
    result = timed_run(tool, "blocks = []\nwhile True:\n    blocks.append(bytearray(2**20))")
    assert result.splitlines()[-1] == "MemoryError"
    assert timed_run(tool, "bytearray(10**10)").splitlines()[-1] == "MemoryError"
    assert timed_run(tool, "import math\nlen(bytearray(100 * 2**20))") == str(100 * 2**20)  # below the limit


@pytest.mark.skipif(not AS_ROOT, reason="as non-root RLIMIT_NPROC applies to all of the user's processes")
def test_fork_bomb_is_contained(tool):
    # First prove the process limit applies (a bounded probe), only then let a real fork bomb loose.
    probe = """
import os, time
born = 0
try:
    for _ in range(40):
        if os.fork() == 0:
            time.sleep(0.5)
            os._exit(0)
        born += 1
except BlockingIOError:
    print('refused after', born)
"""
    result = timed_run(tool, probe)
    assert result.startswith("refused after "), result
    assert int(result.split()[-1]) <= tool.max_processes
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = timed_run(tool, bomb)
    assert "TimeoutError" in result
    time.sleep(0.3)
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    leftovers = [p for p in pids if _uid_of(p) in SANDBOX_UIDS and not _zombie(p)]
    assert leftovers == []


def _uid_of(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Uid:"))
    except OSError:
        return None


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("how", ["open", "os.open", "mkdir", "dir_fd", "symlink", "shell"])
def test_writes_outside_the_sandbox_are_refused(tool, how):
    target = f"/tmp/appo_escape_{uuid.uuid4().hex}"
    code = {"open": f"open({target!r}, 'w').write('escaped')",
            "os.open": f"import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
            "mkdir": f"import os\nos.mkdir({target!r})",
            "dir_fd": f"import os\nfd = os.open('/tmp', os.O_RDONLY)\n"
                      f"os.open({os.path.basename(target)!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
            "symlink": f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('escaped')",
            "shell": f"import os\nos.system('touch {target}')"}[how]
    result = timed_run(tool, code)
    assert "PermissionError" in result
    assert not os.path.exists(target)


@pytest.mark.skipif(not AS_ROOT, reason="the mount namespace needs root")
def test_kernel_refuses_writes_that_bypass_the_audit_hook(tool):
    # ctypes calls libc directly, past the audit hook: the uid and the read-only binds must still refuse.
    targets = [f"/tmp/appo_escape_{uuid.uuid4().hex}", f"/dev/shm/appo_escape_{uuid.uuid4().hex}",
               "/etc/appo_escape_" + uuid.uuid4().hex]
    code = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n" + "".join(
        f"print(libc.open({t.encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644), ctypes.get_errno())\n"
        for t in targets)
    with open("/proc/self/mountinfo") as mounts:
        mounts_before = mounts.read()
    lines = timed_run(tool, code).splitlines()
    assert [line.split()[0] for line in lines] == ["-1"] * 3, lines
    assert all(not os.path.exists(t) for t in targets)
    with open("/proc/self/mountinfo") as mounts:
        assert mounts.read() == mounts_before  # nothing leaked into this namespace


def test_writes_inside_the_sandbox_work_and_the_directory_is_removed(tool):
    code = "import os\nopen('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read(), os.getcwd())"
    content, workdir = timed_run(tool, code).split()
    assert content == "kept"
    assert os.path.basename(workdir).startswith("appo_sandbox_")
    assert not os.path.exists(workdir)


def test_network_is_refused(tool):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        result = timed_run(tool, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert "PermissionError: network access is disabled in the sandbox" in result
        with pytest.raises(socket.timeout):
            server.accept()


@pytest.mark.skipif(not AS_ROOT, reason="the network namespace needs root")
def test_network_namespace_holds_without_the_audit_hook(tool):
    # ctypes calls libc directly, past the audit hook: the empty network namespace must still refuse.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        code = f"""
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
address = struct.pack('>HH4s8x', 0, {port}, bytes([127, 0, 0, 1]))
address = struct.pack('<H', 2) + address[2:]
print('connect', libc.connect(fd, address, len(address)), ctypes.get_errno())
"""
        result = timed_run(tool, code)
        assert result.startswith("connect -1 "), result
        with pytest.raises(socket.timeout):
            server.accept()


def test_output_flood_is_capped(tool):
    start = time.monotonic()
    result = timed_run(tool, "while True:\n    print('flood' * 20)")
    assert time.monotonic() - start < LIMIT_S  # stopped at the cap, well before the deadline
    assert len(result) <= tool.max_output_chars
    assert result.endswith(f"OutputLimitError: output exceeded {tool.max_capture_bytes} bytes (stopped)")
    assert "chars omitted" in result


@pytest.mark.skipif(not AS_ROOT, reason="privileges are only dropped when the parent is root")
def test_code_runs_unprivileged(tool):
    uid, gid = map(int, timed_run(tool, "import os\nprint(os.getuid(), os.getgid())").split())
    assert uid == gid and uid in SANDBOX_UIDS
    nobody = PythonTool(uid=65534, gid=65534)
    assert nobody.run("import os\nos.getuid(), os.getgid(), os.getgroups()") == "(65534, 65534, [])"


def test_parallel_calls_are_independent(tool):
    # more concurrent sandboxes than one sandbox's process limit: each has its own uid, hence its own budget
    code = "import os, threading\nt = threading.Thread(target=print)\nt.start(); t.join()\nprint(os.getuid())"
    uids = [int(r.split()[-1]) for r in tool.run_batch([code] * 6, max_workers=6)]
    assert len(set(uids)) == 6


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="timeout_s"):
        PythonTool(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        PythonTool(memory_mb=16)
    with pytest.raises(ValueError, match="uid"):
        PythonTool(uid=0, gid=0)
