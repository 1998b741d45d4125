"""Red team, sandbox: hostile model code, as root and as an unprivileged user, against appo's PythonTool.

Each probe category must end within 2x its limit, give the model a clear message, create no file outside the
sandbox's working directory, leave no process behind (even when the trainer is SIGKILLed, is a subreaper, or
has no cgroup to use) and leave the parent alive. The probes that issue 20 added (other processes' memory,
socket families, syscalls a container runtime refuses, the interpreter prefix's files, the status line, the
CPU time of a call, code that outlives its deadline) each failed on the code before it.

Run as root (as CI does), the unprivileged runs use a system user this module creates (useradd) and a
private mount namespace in which the interpreter's folder is reachable for that user (here Python lives under
/root, mode 700); the probes then run in a separate process started with setpriv, holding no capability.
Run as an ordinary user, the root cases skip and the probes run in this process.
"""

import ast
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from appo.tools.python_sandbox import PythonTool
from appo.tools.sandbox import cgroups, view
from appo.tools.sandbox.identities import SANDBOX_UIDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sandbox_probes import (MARK, OUTLIVE_CALLS, OUTLIVE_TIMEOUT_S, PROBE_OPTIONS, PROBES,  # noqa: E402
                             TOOL_OPTIONS, run_probes)

RUNNER = Path(__file__).resolve().parent / "_sandbox_probes.py"
REPO = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0
USER = "appo-redteam"
OUTLIVE_UIDS = [901_100, 1]  # outside SANDBOX_UIDS: one uid for three calls
LIMIT_S = TOOL_OPTIONS["timeout_s"]
MAIN_PROBES = [name for name in PROBES if name not in OUTLIVE_CALLS]  # the outlive runs have their own test


# ------------------------------------------------------------------ the host side: files, processes, users
def processes() -> dict[int, tuple[int, int, str]]:
    """{pid: (uid, ppid, state)} of every live (non-zombie) process on the host."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as file:
                fields = dict(line.split(":", 1) for line in file.read().splitlines() if ":" in line)
        except OSError:
            continue
        state = fields["State"].split()[0]
        if state != "Z":
            found[int(name)] = (int(fields["Uid"].split()[0]), int(fields["PPid"]), state)
    return found


def sandbox_leftovers() -> list[int]:
    """Live processes of this suite's sandboxes (bwrap, init, worker, anything they forked): their command
    lines carry MARK; other sandboxes on the machine (other test runs) do not count."""
    found = []
    for pid in processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                if MARK.encode() in file.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def descendants(root: int) -> set[int]:
    table = processes()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (_, ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def wait_until_gone(pids, timeout_s: float = 2.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = set(pids) & set(processes())
        if not alive:
            return set()
        time.sleep(0.05)
    return set(pids) & set(processes())


@pytest.fixture(scope="module")
def redteam_user():
    """(uid, gid) of an unprivileged system user with no home and no login (created once, kept)."""
    if not AS_ROOT:
        return os.getuid(), os.getgid()
    if shutil.which("useradd") is None or shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("needs useradd, setpriv and unshare to run the probes as an unprivileged user")
    if subprocess.run(["id", "-u", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True, capture_output=True)
    uid = int(subprocess.run(["id", "-u", USER], capture_output=True, text=True, check=True).stdout)
    gid = int(subprocess.run(["id", "-g", USER], capture_output=True, text=True, check=True).stdout)
    return uid, gid


def reachable_mounts_script(paths) -> str:
    """Shell lines (run as root in a private mount namespace) after which every path in ``paths`` can be
    reached by any user: each folder on the way that others may not traverse is covered by a tmpfs holding
    only the needed entries, moved back in from a hold point."""
    lines, covered = [], set()
    for path in paths:
        parts = Path(path).parts
        for depth in range(2, len(parts)):
            folder = str(Path(*parts[:depth]))
            if folder in covered or os.stat(folder).st_mode & stat.S_IXOTH:
                continue
            covered.add(folder)
            needed = sorted({Path(*p.parts[:depth + 1]).name for p in map(Path, paths)
                             if len(p.parts) > depth and str(Path(*p.parts[:depth])) == folder})
            for i, name in enumerate(needed):
                hold = f"/run/appo-redteam-hold-{os.getpid()}-{i}"
                lines.append(f"mkdir -p {hold} && mount --bind '{folder}/{name}' {hold}")
            lines.append(f"mount -t tmpfs -o mode=755,size=1m tmpfs '{folder}'")
            for i, name in enumerate(needed):
                hold = f"/run/appo-redteam-hold-{os.getpid()}-{i}"
                lines.append(f"mkdir '{folder}/{name}' && mount --move {hold} '{folder}/{name}'")
                lines.append(f"rmdir {hold}")
            break
    return "\n".join(lines)


def as_user_command(user, mode: str) -> list[str]:
    """argv that runs the probe runner as the unprivileged user (no capabilities, no supplementary groups)."""
    uid, gid = user
    paths = [*view.interpreter_paths(), str(REPO)]
    script = "set -e\n" + reachable_mounts_script(paths) + (
        f"\nexec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all --bounding-set=-all "
        f"-- env -i HOME=/ PATH=/usr/bin:/bin {sys.executable} {RUNNER} {mode}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


# ------------------------------------------------------------------ the probe runs
@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    """A root-only file (mode 600 in a mode 700 folder) whose content must never reach the model."""
    folder = tmp_path_factory.mktemp("secret")
    os.chmod(folder, 0o700)
    path = folder / "secret.txt"
    path.write_text("TOP-SECRET-" + uuid.uuid4().hex)
    os.chmod(path, 0o600)
    return path


@pytest.fixture(scope="module")
def server():
    """A TCP server on the host's loopback: no probe may reach it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        yield listener


def probe_params(secret, server, mode: str) -> dict:
    marker = f"appo_escape_{uuid.uuid4().hex}"
    allowed = [*view.interpreter_paths(), *view.LIBRARY_DIRS, *view.DEVICES, "/proc", "/tmp", "/.appo",
               "/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr", "/dev/shm"]
    if mode == "root":
        allowed.append(shutil.which("setpriv"))
    # /tmp and /dev/shm are the sandbox's own (its working directory): writes there succeed and stay inside
    folders = ("/tmp", "/dev/shm", "/var/tmp", "/etc", "/usr/lib", "/", str(REPO),
               os.path.dirname(view.interpreter()), view.interpreter_paths()[-1])
    markers = [f"{d}/{marker}".replace("//", "/") for d in folders]
    return {"secret": str(secret), "allowed": allowed, "markers": markers, "marker_name": marker,
            "host_pid": os.getpid(), "port": server.getsockname()[1], "prefix": sys.prefix}


def check_host_after(params: dict) -> None:
    """Nothing written outside the sandbox, no sandbox process left."""
    written = [m for m in params["markers"] if os.path.exists(m)]
    assert written == [], f"files created outside the sandbox: {written}"
    leftovers = wait_until_gone(sandbox_leftovers())
    assert not leftovers, f"sandbox processes left behind: {leftovers}"


@pytest.fixture(scope="module")
def root_results(secret, server):
    if not AS_ROOT:
        pytest.skip("the root mode needs root")
    params = probe_params(secret, server, "root")
    results = run_probes(MAIN_PROBES, params, TOOL_OPTIONS)
    check_host_after(params)
    return results, params


@pytest.fixture(scope="module")
def user_results(secret, server, redteam_user):
    params = probe_params(secret, server, "userns")
    if not AS_ROOT:
        results = run_probes(MAIN_PROBES, params, TOOL_OPTIONS)
    else:
        request = json.dumps({"names": MAIN_PROBES, "params": params, "tool": TOOL_OPTIONS})
        done = subprocess.run(as_user_command(redteam_user, "run"), input=request, capture_output=True,
                              text=True, timeout=300, cwd="/")
        assert done.returncode == 0, done.stderr[-2000:]
        results = json.loads(done.stdout.strip().splitlines()[-1])
    check_host_after(params)
    return results, params


@pytest.fixture(params=["root", "user"])
def results(request):
    outcome = request.getfixturevalue(f"{request.param}_results")
    if "refused" in outcome[0]:
        pytest.skip(f"no sandbox in this mode here (test_refusal_is_clean checks the refusal): "
                    f"{outcome[0]['refused'][:200]}")
    return outcome


def result_of(results, name: str) -> str:
    outcome = results[0][name]
    limit_s = PROBE_OPTIONS.get(name, {}).get("timeout_s", LIMIT_S)
    assert outcome["elapsed"] < 2 * limit_s, f"{name} took {outcome['elapsed']:.2f} s"
    return outcome["result"]


# ------------------------------------------------------------------ one test per category
def test_refusal_is_clean(user_results):
    # where the kernel allows no unprivileged sandbox, the tool refuses and says how to get one; it never
    # advises running model code unconfined (the opt-out is documented in the README's Security section)
    outcome = user_results[0]
    if "refused" in outcome:
        assert "install" in outcome["refused"] and "Security" in outcome["refused"]
        assert "unconfined" not in outcome["refused"].lower() and "APPO_ALLOW" not in outcome["refused"]
    else:
        assert outcome["_mode"] == "userns"


def test_no_capabilities_and_no_root(results):
    text = result_of(results, "capabilities")
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert f"'{key}': '0000000000000000'" in text, text
    assert "'NoNewPrivs': '1'" in text
    uid = int(text.split("uid ")[1].split()[0])
    assert uid != 0
    refusal = result_of(results, "setuid_root").splitlines()[-1]  # EPERM as root-mode uid, EINVAL in a userns
    assert refusal in ("PermissionError: [Errno 1] Operation not permitted",
                       "OSError: [Errno 22] Invalid argument")


def test_reads_root_only_file_and_nothing_outside_the_view(results, secret):
    text = result_of(results, "read_secret")
    assert secret.read_text() not in text
    assert "FileNotFoundError" in text or "PermissionError" in text
    assert "FileNotFoundError" in result_of(results, "read_shadow")
    assert result_of(results, "view") == "outside the view: []"


def test_writes_outside_the_working_directory_fail(results):
    lines = result_of(results, "write_outside").splitlines()
    private, outside = lines[:4], lines[4:]  # /tmp, /dev/shm: the sandbox's own; the rest: the host's
    assert [line.split()[0] for line in private] == ["WROTE", "ctypes", "WROTE", "ctypes"]
    refusals = [line for line in outside if line.startswith("refused")]
    assert len(refusals) == len(results[1]["markers"]) - 2 and "WROTE" not in "\n".join(outside)
    assert all("Read-only file system" in r or "No such file" in r or "Permission denied" in r
               for r in refusals)
    assert all(line.split()[1] == "-1" for line in outside if line.startswith("ctypes"))
    assert result_of(results, "private_tmp") == "inside"  # and none of it is on the host: check_host_after


def test_proc_is_the_sandbox_own(results):
    text = result_of(results, "proc")
    pids = json.loads(text.splitlines()[0].split("pids ")[1])
    assert pids == sorted(pids) and len(pids) <= 3 and pids[0] == 1
    assert "host pid visible False" in text or results[1]["host_pid"] in pids  # a small host pid may coincide
    assert "pytest" not in text and "child.py" in text.splitlines()[-1]


def test_memory_budget_covers_every_process_and_memfd(results):
    text = result_of(results, "memory_forks")
    bound = results[0]["_memory_bound_mb"]
    if text.startswith("children that held 100 MiB:"):
        held = int(text.split(":")[1].split()[0])
        assert held * 100 <= bound
    else:
        assert "MemoryError" in text, text
    if results[0]["_mode"] == "root" and cgroups.controls_memory():
        assert bound == TOOL_OPTIONS["memory_mb"]
        assert "MemoryError: the sandbox used up its memory budget" in text
    memfd = result_of(results, "memfd")
    assert "memfd_create PermissionError Operation not permitted" in memfd
    assert "memfd syscall -1 1" in memfd and "shmget -1 1" in memfd


def test_disk_budget(results):
    text = result_of(results, "disk")
    assert "No space left on device" in text or "File too large" in text, text
    assert int(text.split("after ")[1].split()[0]) <= TOOL_OPTIONS["disk_mb"]


def test_process_bombs_are_contained(results):
    text = result_of(results, "process_limit")
    assert text.startswith("refused after ") and "Resource temporarily unavailable" in text, text
    assert int(text.split()[2]) <= TOOL_OPTIONS["max_processes"]
    # killed at the 3 s deadline, or earlier by the call's CPU budget (4 s summed over its processes)
    bomb = result_of(results, "fork_bomb")
    assert ("TimeoutError: execution exceeded 3 s (killed)" in bomb
            or "TimeoutError: CPU time limit of 4 s exceeded (killed)" in bomb), bomb
    assert result_of(results, "daemon") == "left a daemon behind"  # and gone: checked on the host


def test_the_parent_survives_kill_attempts(results):
    # SIGKILL to the sandbox's parent (its own init), to every process it can see, and to the host's pid
    text = result_of(results, "kill_parent")
    assert text.endswith("still here")
    host_pid = results[1]["host_pid"]
    assert f"kill {host_pid} ProcessLookupError" in text  # the host's processes are not in its PID namespace
    assert os.getpid() in processes()  # and the runner lived to report (user mode: another process)


def test_network_is_unreachable(results, server):
    # an empty network namespace, and no internet socket to start with (only AF_UNIX may be created)
    text = result_of(results, "network")
    assert "CONNECTED" not in text and "Address family not supported by protocol" in text
    assert "ctypes socket -1 97" in text and "ctypes connect -1 9" in text  # EAFNOSUPPORT, then EBADF
    with pytest.raises(socket.timeout):
        server.accept()


def test_only_unix_sockets_can_be_made(results):
    # before issue 20 every family opened, AF_VSOCK (to the hypervisor, no namespace isolates it) included
    lines = result_of(results, "sockets").splitlines()
    families = [line for line in lines if line.startswith("AF_") and "high bits" not in line]
    assert len(families) == 12 and all(line.endswith(" [97]") for line in families), lines
    assert "AF_VSOCK with high bits -1 97" in lines  # the upper half of the argument slips nothing past
    assert lines[-1] == "unix ok"


def test_no_process_can_write_or_read_another_s_memory(results):
    # before issue 20 init was dumpable and shared the worker's uid: its memory was writable through procfs
    lines = result_of(results, "memory_of_others").splitlines()
    assert lines[:4] == ["init mem PermissionError 13", "sibling mem PermissionError 13",
                         "init environ PermissionError 13", "init fd PermissionError 13"], lines
    assert lines[4:] == ["set dumpable -1 1", "set dumpable high bits -1 1", "dumpable 0"], lines


def test_system_calls_a_container_runtime_refuses_are_refused(results):
    lines = result_of(results, "syscalls").splitlines()
    if lines[0] != "arch x86_64":
        pytest.skip(f"the probe's system call numbers are x86_64's ({lines[0]})")
    refused = lines[1:-1]
    assert len(refused) == 28 and all(line.endswith(" -1 1") for line in refused), lines  # EPERM
    assert lines[-1] == "personality query 0 0"  # allowed, as in Docker's profile, and nothing was changed


def test_the_view_holds_the_interpreter_not_its_prefix(results):
    # before issue 20 the whole prefix was in view (bin/pip, include/, a venv's pip.conf)
    lines = result_of(results, "prefix").splitlines()
    interpreter = view.interpreter()
    assert lines[2] == interpreter
    if os.path.dirname(os.path.dirname(interpreter)) == sys.prefix:  # a prefix of its own (not /usr)
        assert lines[1] == str([os.path.basename(interpreter)])
        assert set(ast.literal_eval(lines[0])) <= {"bin", "lib"}, lines[0]


def test_the_status_line_is_the_parent_s_observation(results):
    # before issue 20 exit code 121 read "the code was not run", 137 "Killed by signal SIGKILL", and a
    # self-sent SIGXCPU "CPU time limit exceeded"; model code now controls only its output and exit code
    assert result_of(results, "exit_121") == "Process exited with status 121"
    assert result_of(results, "exit_137") == "bye\nProcess exited with status 137"
    assert result_of(results, "fake_sigxcpu").splitlines()[-1] == "Killed by signal SIGXCPU"


def test_cpu_time_is_bounded_per_call(results):
    # three busy children, each under its own RLIMIT_CPU of 1 s: before issue 20 they used 3 s between them
    text = result_of(results, "cpu_total")
    assert text == "TimeoutError: CPU time limit of 1 s exceeded (killed)", text


def test_no_new_namespaces_mounts_or_tracing(results):
    text = result_of(results, "namespaces")
    assert "unshare user -1 1" in text and "unshare mount -1 1" in text
    assert "mount -1 1" in text and "ptrace -1 1" in text


def test_a_busy_trainer_does_not_starve_the_sandbox(results):
    # the runner started 21 idle threads first (the failing case for the non-root mode)
    assert result_of(results, "threads") == "thread ok"


@pytest.mark.parametrize("trainer", ["root-subreaper", pytest.param("root-pid1", marks=pytest.mark.slow),
                                     "user-subreaper"])
def test_code_that_outlives_its_deadline_leaves_nothing_without_a_cgroup(trainer, redteam_user):
    """The cgroup path forced off, in a trainer that is a child subreaper (orphans become its children) or
    PID 1 of its own PID namespace: a call whose code tries to patch init, starts a daemon in a new session,
    ignores signals and runs past its deadline ends by the deadline + 1 s with nothing of it left, zombies
    included; so does a call whose bubblewrap is SIGKILLed under it (its init is then this trainer's child);
    as root, with 1 sandbox uid, 3 calls all run. Before issue 20 the patch took (init spun in
    select), init, worker and daemon lived on, and the tool reported the code killed."""
    mode, kind = trainer.split("-")
    if mode == "root":
        if not AS_ROOT:
            pytest.skip("the root mode needs root")
        argv = [sys.executable, str(RUNNER), "outlive"]
        if kind == "pid1":
            if shutil.which("unshare") is None:
                pytest.skip("needs unshare to start a trainer as PID 1")
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
    else:
        argv = [sys.executable, str(RUNNER), "outlive"]
        argv = as_user_command(redteam_user, "outlive") if AS_ROOT else argv
    request = json.dumps({"uids": OUTLIVE_UIDS if mode == "root" else None})
    done = subprocess.run(argv, input=request, capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [call["name"] for call in report] == [*OUTLIVE_CALLS, "end"]
    nothing = {"zombie_children": [], "marked": [], "uid_owned": []}
    for call in report[:-1]:
        if call["name"] == "outlive":
            assert call["result"].splitlines() == [
                "init untouched PermissionError", "daemon started",
                f"TimeoutError: execution exceeded {OUTLIVE_TIMEOUT_S:g} s (killed)"], call["result"]
            assert call["elapsed"] < OUTLIVE_TIMEOUT_S + 1.0, call
        elif call["name"] == "orphaned":  # bubblewrap SIGKILLed under a running call: nothing left either
            ended = "SandboxError: the sandbox ended before the code did (its init reported no exit)"
            assert call["result"].splitlines() == ["started", ended], call["result"]
        else:
            assert call["result"] == "quick", call["result"]
        assert call["left"] == nothing, call
    assert report[-1]["left"] == nothing
    assert wait_until_gone(sandbox_leftovers()) == set()


@pytest.mark.parametrize("mode", ["root", "user"])
def test_sigkill_of_the_trainer_leaves_no_process(mode, redteam_user):
    if mode == "root":
        if not AS_ROOT:
            pytest.skip("the root mode needs root")
        argv, uids = [sys.executable, str(RUNNER), "hold"], SANDBOX_UIDS
    else:
        argv = as_user_command(redteam_user, "hold") if AS_ROOT else [sys.executable, str(RUNNER), "hold"]
        uids = {redteam_user[0]}
    trainer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert trainer.stdout.readline().strip() == "ready", trainer.stderr.read()[-2000:]
        tree = descendants(trainer.pid)
        sandbox = [p for p in tree if processes().get(p, (None,))[0] in uids]
        assert len(sandbox) >= 3, "the call should be running: its init, the worker and the daemon"
    finally:
        trainer.kill()
        trainer.wait()
    assert wait_until_gone(tree) == set(), "processes of the killed trainer's sandbox survived"
    assert wait_until_gone(sandbox_leftovers()) == set()
    if mode == "root":
        found = cgroups.layout()
        if found is not None:  # its cgroups are swept by the next process that starts a sandbox
            subprocess.run([sys.executable, "-c", "from appo.tools.python_sandbox import PythonTool; "
                            "PythonTool().run('1')"], check=True, cwd=str(REPO))
            for parent in set(found[1].values()):
                assert not [n for n in os.listdir(parent) if n.startswith(f"appo-sandbox-{trainer.pid}-")]


def test_two_processes_get_distinct_sandbox_uids():
    if not AS_ROOT:
        pytest.skip("uids are leased in the root mode only")
    code = "import os, time\nprint(os.getuid())\ntime.sleep(1.5)"
    program = ("import sys; from appo.tools.python_sandbox import PythonTool; "
               "print(PythonTool().run(sys.argv[1]))")
    runs = [subprocess.Popen([sys.executable, "-c", program, code], stdout=subprocess.PIPE, text=True,
                             cwd=str(REPO)) for _ in range(2)]
    uids = [int(run.communicate(timeout=60)[0].strip()) for run in runs]
    assert uids[0] != uids[1] and all(u in SANDBOX_UIDS for u in uids)


def test_the_parent_process_is_untouched():
    tool = PythonTool(**TOOL_OPTIONS)
    before = (os.getcwd(), dict(os.environ), open("/proc/self/mountinfo").read())
    tool.run("import os\nos.chdir('/')\nos.environ['X'] = '1'")
    assert (os.getcwd(), dict(os.environ), open("/proc/self/mountinfo").read()) == before
