"""The Python tool runs model code like a script, in a sandbox, and reports every way a run can end.

The hostile probes (escapes, budgets, leftovers, non-root) are in tests/redteam/test_sandbox.py.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from appo.tools.python_sandbox import ALLOW_UNCONFINED_ENV, PythonTool, SandboxUnavailable
from appo.tools.sandbox import bwrap, cgroups

LIMIT_S = 2.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    return PythonTool(timeout_s=LIMIT_S)


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


def test_imports_stdlib_and_site_packages_and_indented_body(tool):
    code = """
        import math
        from fractions import Fraction
        import numpy
        print(math.comb(10, 3), Fraction(3, 4) + Fraction(1, 6), int(numpy.arange(5).sum()))
    """
    assert timed_run(tool, code) == "120 11/12 10"


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
    assert "child.py" not in result  # the sandbox's own frames are hidden


def test_stderr_and_exit_codes(tool):
    assert timed_run(tool, "import sys\nprint('out')\nprint('err', file=sys.stderr)") == "out\nerr"
    assert timed_run(tool, "raise SystemExit(3)") == "Process exited with status 3"
    assert timed_run(tool, "raise SystemExit(0)") == "(no output)"


def test_infinite_loop_is_killed_at_the_wall_clock_limit(tool):
    start = time.monotonic()
    result = timed_run(tool, "print('started')\nwhile True:\n    pass")
    assert time.monotonic() - start >= LIMIT_S * 0.95
    assert result.splitlines() == ["started", "TimeoutError: execution exceeded 2 s (killed)"]


def test_cpu_limit_applies_when_the_wall_clock_is_longer():
    tool = PythonTool(timeout_s=20.0, cpu_time_s=1)  # a busy machine may give it a fraction of a core
    start = time.monotonic()
    result = tool.run("while True:\n    pass")
    assert time.monotonic() - start < 15.0
    assert "CPU time limit of 1 s exceeded" in result


def test_one_process_memory_bomb_gives_memory_error():
    tool = PythonTool(timeout_s=LIMIT_S, memory_mb=160, disk_mb=16)  # small: filling it is quick under load
    result = timed_run(tool, "blocks = []\nwhile True:\n    blocks.append(bytearray(2**20))")
    assert result.splitlines()[-1].startswith("MemoryError"), result
    assert timed_run(tool, "bytearray(10**10)").splitlines()[-1] == "MemoryError"
    assert timed_run(tool, "len(bytearray(100 * 2**20))") == str(100 * 2**20)  # below the limit


def test_working_directory_is_private_writable_and_gone_after_the_call(tool):
    code = "import os\nopen('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read(), os.getcwd())"
    assert timed_run(tool, code) == "kept /tmp"
    assert "No such file" in timed_run(tool, "open('notes.txt').read()")  # a fresh sandbox each call


def test_output_flood_is_capped(tool):
    start = time.monotonic()
    result = timed_run(tool, "while True:\n    print('flood' * 20)")
    assert time.monotonic() - start < LIMIT_S  # stopped at the cap, well before the deadline
    assert len(result) <= tool.max_output_chars
    assert result.endswith(f"OutputLimitError: output exceeded {tool.max_capture_bytes} bytes (stopped)")
    assert "chars omitted" in result


def test_parallel_calls_are_independent(tool):
    # more concurrent sandboxes than one sandbox's process limit: each has its own budget
    code = "import threading\nt = threading.Thread(target=print)\nt.start(); t.join()\nprint('ok')"
    assert tool.run_batch([code] * 12, max_workers=12) == ["\nok"] * 12


def test_bad_options_raise_value_error():
    for kwargs, name in [({"timeout_s": 0}, "timeout_s"), ({"memory_mb": 16}, "memory_mb"),
                         ({"disk_mb": 600}, "disk_mb"), ({"max_file_mb": 100, "disk_mb": 64}, "max_file_mb"),
                         ({"max_processes": True}, "max_processes"), ({"cpu_time_s": -1}, "cpu_time_s")]:
        with pytest.raises(ValueError, match=name):
            PythonTool(**kwargs)


@pytest.fixture
def no_bubblewrap(monkeypatch):
    """This machine as if bubblewrap were missing (detect() is cached: cleared before and after)."""
    bwrap.detect.cache_clear()
    monkeypatch.setattr(bwrap.shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.delenv(ALLOW_UNCONFINED_ENV, raising=False)
    yield
    bwrap.detect.cache_clear()


def test_without_confinement_code_is_refused_unless_the_user_opts_in(no_bubblewrap, monkeypatch):
    with pytest.raises(SandboxUnavailable, match="bubblewrap.*install") as refusal:
        PythonTool()
    message = str(refusal.value)  # how to get a sandbox; the opt-out is explained in the README, not advised
    assert "scripts/install.sh" in message and "Security" in message
    assert "unconfined" not in message.lower() and ALLOW_UNCONFINED_ENV not in message
    with pytest.warns(UserWarning, match="UNCONFINED"):
        tool = PythonTool(allow_unconfined=True, timeout_s=LIMIT_S)
    assert tool.confinement is None and tool.memory_bound_mb is None
    assert timed_run(tool, "print(6 * 7)") == "42"
    assert "PermissionError" in timed_run(tool, "import socket\nsocket.socket()")  # the courtesy hook
    monkeypatch.setenv(ALLOW_UNCONFINED_ENV, "1")
    with pytest.warns(UserWarning, match="UNCONFINED"):
        assert PythonTool().confinement is None
    monkeypatch.setenv(ALLOW_UNCONFINED_ENV, "yes")  # only "1" opts in
    with pytest.raises(SandboxUnavailable):
        PythonTool()


def test_a_bubblewrap_without_the_needed_options_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'usage: bwrap [OPTIONS...] --bind SRC DEST --tmpfs DEST'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(ALLOW_UNCONFINED_ENV, raising=False)
    bwrap.detect.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="too old: no --size"):
            PythonTool()
    finally:
        bwrap.detect.cache_clear()


def test_a_sandbox_that_cannot_be_built_runs_no_code(tool, monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    # break the view: a missing child script makes bubblewrap fail before anything runs
    monkeypatch.setattr(bwrap, "CHILD_SCRIPT", str(tmp_path / "missing.py"))
    result = tool.run(f"open({str(marker)!r}, 'w')")
    assert result.startswith("SandboxError: the sandbox could not be set up"), result
    assert "the code was not run" in result
    assert not marker.exists()


def test_memory_bound_is_reported(tool):
    from appo.tools.sandbox.cgroups import layout
    expected = tool.memory_mb if layout() else tool.memory_mb * (tool.max_processes + 2) + tool.disk_mb
    assert tool.memory_bound_mb == expected


def test_no_file_descriptor_is_left_open_in_the_parent(tool):
    timed_run(tool, "print(1)")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        timed_run(tool, "print(1)")
    assert len(os.listdir("/proc/self/fd")) == before


def processes_of(uid: int) -> list[str]:
    """'pid state' of every process of ``uid``, zombies included."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid:
                with open(f"/proc/{name}/stat") as file:
                    found.append(f"{name} {file.read().rsplit(')', 1)[1].split()[0]}")
        except OSError:
            pass
    return found


def test_without_a_cgroup_the_bounds_are_per_process_and_nothing_outlives_the_call(monkeypatch):
    monkeypatch.setattr(cgroups, "layout", lambda: None)
    tool = PythonTool(timeout_s=LIMIT_S, memory_mb=128, disk_mb=16, max_processes=4)
    assert tool.memory_bound_mb == 128 * 6 + 16
    bomb = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n" \
           "    except OSError:\n        pass"
    result = timed_run(tool, bomb)
    assert result.endswith("TimeoutError: execution exceeded 2 s (killed)"), result
    if os.geteuid() == 0:  # a user-namespace sandbox runs as this user: its processes cannot be told apart
        assert processes_of(int(result.split()[0])) == []  # gone, zombies too, before the call returned


def test_the_status_line_never_comes_from_the_code(tool):
    assert timed_run(tool, "import os\nos._exit(121)") == "Process exited with status 121"
    suicide = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    assert timed_run(tool, suicide) == "Killed by signal SIGKILL"


VENV_PROGRAM = """
import json, sys
from appo.tools.python_sandbox import PythonTool
tool = PythonTool(timeout_s=10)
print(json.dumps([tool.run(code) for code in json.loads(sys.argv[1])]))
"""


@pytest.fixture(scope="module")
def venv_under_tmp(tmp_path_factory):
    """A venv under /tmp (pytest's tmp_path is there) with the system site-packages, and a pip.conf holding an
    index token, as a user's own venv would."""
    folder = tmp_path_factory.mktemp("venv") / "venv"
    assert str(folder).startswith("/tmp/")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(folder)],
                   check=True, timeout=120)
    token = f"token-{uuid.uuid4().hex}"
    (folder / "pip.conf").write_text(f"[global]\nindex-url = https://user:{token}@pypi.invalid/simple\n")
    return folder, token


def test_the_tool_runs_from_a_venv_under_tmp_and_shows_none_of_its_configuration(venv_under_tmp):
    # before issue 20 the sandbox's own /tmp hid such an interpreter, and the whole prefix was in view
    folder, token = venv_under_tmp
    codes = ["import os, sys\nprint(os.getcwd(), sys.executable == os.path.realpath(sys.executable))",
             f"print(open({str(folder / 'pip.conf')!r}).read())",
             f"import os\nprint(sorted(os.listdir({str(folder)!r})))",
             "import numpy\nprint(numpy.arange(4).sum())"]
    done = subprocess.run([str(folder / "bin" / "python"), "-c", VENV_PROGRAM, json.dumps(codes)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert results[0] == "/tmp True"
    assert token not in "".join(results) and results[1].endswith("No such file or directory: "
                                                                 f"'{folder / 'pip.conf'}'")
    assert results[2] == "['lib']"  # only lib/python3.X/site-packages: no pip.conf, pyvenv.cfg, bin/
    assert results[3] == "6"


@pytest.mark.slow
def test_appo_train_runs_its_python_tool_from_a_venv_under_tmp(venv_under_tmp, tiny_model_dir, tmp_path):
    """`appo train` (conftest's tiny model, 1 step, the arithmetic task's python tool) started by the venv's
    interpreter: the tool is built (its sandbox proven by one start from that interpreter) and training ends.
    Before issue 20 it stopped at once: the sandbox's /tmp hid the interpreter."""
    folder, _ = venv_under_tmp
    overrides = [f"model.name_or_path={tiny_model_dir}", "device=cpu", "threads=1", "steps=1",
                 "prompts_per_step=2", "optim.minibatches_per_step=1", "data.train_size=4",
                 "data.eval_size=2", "data.few_shot=1", "data.tool=python", "rollout.max_prompt_tokens=1500",
                 "rollout.max_total_tokens=1540", "rollout.max_new_tokens_per_turn=8"]
    env = {k: v for k, v in os.environ.items() if k != ALLOW_UNCONFINED_ENV}
    done = subprocess.run([str(folder / "bin" / "python"), "-m", "appo.cli", "train", *overrides],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "appo train: appo, 1 steps -> runs/" in done.stdout, done.stdout[-2000:]
