"""Probes for the sandbox red team: hostile code, run through PythonTool, from this process or as a script.

``python _sandbox_probes.py run`` reads {"names": [...], "params": {...}, "tool": {...}} as json on stdin,
starts 21 idle threads (a busy trainer), runs each named probe with ``PythonTool(**tool)`` (updated by
``PROBE_OPTIONS[name]``) and prints {name: {"result", "elapsed"}} as json on its last line ({"refused":
message} when the tool refuses to start). ``python _sandbox_probes.py hold`` starts one long call whose code
leaves a daemon, prints "ready" and waits to be killed. ``python _sandbox_probes.py outlive`` reads {"uids":
[first, count] or null} and, as a trainer that is a child subreaper (orphans are reparented to it) with the
cgroup path forced off and only ``count`` sandbox uids, runs ``OUTLIVE_CALLS``; after each call it lists what
is left of it (see ``leftovers``). The test module checks the results and the host afterwards.
"""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

TOOL_OPTIONS = {"timeout_s": 3.0, "memory_mb": 257, "disk_mb": 32, "max_processes": 8}
# the odd memory limit marks this suite's sandboxes: their command lines hold it in bytes (sandbox_leftovers)
MARK = str(TOOL_OPTIONS["memory_mb"] * 2**20)
# the wall clock is no bound for cpu_total; memory_forks can take seconds to fill its budget on a busy machine
PROBE_OPTIONS = {"cpu_total": {"cpu_time_s": 1, "timeout_s": 10.0}, "memory_forks": {"timeout_s": 10.0}}
OUTLIVE_TIMEOUT_S = 1.0
OUTLIVE_CALLS = ("outlive", "quick", "orphaned")  # more calls than the one uid the root run leaves them

PROBES = {
    "capabilities": """
import os
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
print({key: status[key].strip() for key in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs')})
print('uid', os.getuid(), os.geteuid())
""",
    "setuid_root": "import os\nos.setuid(0)",
    "read_secret": "print(open({secret!r}).read())",
    "read_shadow": "print(open('/etc/shadow').read())",
    "view": """
import json, os
allowed = {allowed!r}
def inside(p):
    return any(p == a or p.startswith(a.rstrip('/') + '/') for a in allowed)
def above(p):
    return any(a.startswith(p.rstrip('/') + '/') for a in allowed)
extra, stack = [], ['/']
while stack:
    folder = stack.pop()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if inside(path):
            continue
        if above(path) and os.path.isdir(path) and not os.path.islink(path):
            stack.append(path)
        else:
            extra.append(path)
print('outside the view:', sorted(extra))
""",
    "write_outside": """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for path in {markers!r}:
    try:
        open(path, 'w').write('escaped')
        print('WROTE', path)
    except OSError as error:
        print('refused', type(error).__name__, error.strerror)
    fd = libc.open(path.encode(), os.O_WRONLY | os.O_CREAT, 0o644)
    print('ctypes', fd, ctypes.get_errno())
""",
    "private_tmp": ("open('/tmp/' + {marker_name!r}, 'w').write('inside')\n"
                    "print(open('/tmp/' + {marker_name!r}).read())"),
    "proc": """
import os
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print('pids', pids)
print('host pid visible', os.path.exists('/proc/{host_pid}'))
print('init', open('/proc/1/cmdline').read().replace('\\0', ' ')[:400])
""",
    "memory_forks": """
import os, time
# Each child holds 100 MiB until the parent lets go; the ones that exit 0 held theirs at the same moment (the
# kernel may kill a child after it has allocated, so counting allocations would overcount).
go_read, go_write = os.pipe()
children = []
for i in range(5):
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        block = bytearray(100 * 2**20)
        block[::4096] = b'x' * len(block[::4096])
        os.read(go_read, 1)
        os._exit(0)
    children.append(pid)
os.close(go_read)
time.sleep(1)
os.close(go_write)
held = sum(os.waitpid(pid, 0)[1] == 0 for pid in children)
print('children that held 100 MiB:', held)
""",
    "memfd": """
import ctypes, os
try:
    os.memfd_create('x')
except OSError as error:
    print('memfd_create', type(error).__name__, error.strerror)
libc = ctypes.CDLL(None, use_errno=True)
print('memfd syscall', libc.syscall(319, b'x', 0), ctypes.get_errno())
print('shmget', libc.shmget(0, 1 << 30, 0o1600), ctypes.get_errno())
""",
    "disk": """
written = 0
try:
    for i in range(1000):
        with open(f'f{i}', 'wb') as out:
            for _ in range(16):
                out.write(b'x' * 2**20)
                written += 1
except OSError as error:
    print('stopped after', written, 'MiB:', error.strerror)
""",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "process_limit": """
import os, time
born = 0
try:
    for _ in range(40):
        if os.fork() == 0:
            time.sleep(1)
            os._exit(0)
        born += 1
except OSError as error:
    print('refused after', born, error.strerror)
""",
    "daemon": """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
print('left a daemon behind')
""",
    "kill_parent": """
import os, signal
for target in (os.getppid(), 1, {host_pid}, -1):
    try:
        os.kill(target, signal.SIGKILL)
        print('signalled', target)
    except OSError as error:
        print('kill', target, type(error).__name__)
print('still here')
""",
    "network": """
import ctypes, socket, struct
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=1)
    print('CONNECTED')
except OSError as error:
    print('connect', type(error).__name__, error.strerror)
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
print('ctypes socket', fd, ctypes.get_errno())
address = struct.pack('<H', 2) + struct.pack('>H4s8x', {port}, bytes([127, 0, 0, 1]))
print('ctypes connect', libc.connect(fd, address, len(address)), ctypes.get_errno())
""",
    "sockets": """
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
families = {'AF_INET': 2, 'AF_INET6': 10, 'AF_NETLINK': 16, 'AF_PACKET': 17, 'AF_KEY': 15, 'AF_RDS': 21,
            'AF_CAN': 29, 'AF_TIPC': 30, 'AF_BLUETOOTH': 31, 'AF_ALG': 38, 'AF_VSOCK': 40, 'AF_XDP': 44}
for name, family in families.items():
    outcomes = set()
    for kind in (1, 2, 3, 5):  # stream, datagram, raw, seqpacket
        fd = libc.socket(family, kind, 0)
        outcomes.add('OPENED' if fd >= 0 else ctypes.get_errno())
    print(name, sorted(outcomes, key=str))
high = libc.syscall(ctypes.c_long(41), ctypes.c_long((1 << 32) | 40), ctypes.c_long(1), ctypes.c_long(0))
print('AF_VSOCK with high bits', high, ctypes.get_errno())
left, right = socket.socketpair()
left.sendall(b'unix ok')
print(right.recv(16).decode())
""",
    "memory_of_others": """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
address = ctypes.cast(libc.select, ctypes.c_void_p).value  # the same in init and its forks
def write_back(pid):
    try:
        with open(f'/proc/{pid}/mem', 'r+b', buffering=0) as memory:
            memory.seek(address)
            original = memory.read(2)
            memory.seek(address)
            memory.write(original)
        return 'WROTE'
    except OSError as error:
        return f'{type(error).__name__} {error.errno}'
def read(path):
    try:
        open(path, 'rb').read(1)
        return 'READ'
    except OSError as error:
        return f'{type(error).__name__} {error.errno}'
child = os.fork()
if child == 0:
    time.sleep(10)
    os._exit(0)
print('init mem', write_back(1))
print('sibling mem', write_back(child))
print('init environ', read('/proc/1/environ'))
print('init fd', read('/proc/1/fd/0'))
print('set dumpable', libc.prctl(4, 1, 0, 0, 0), ctypes.get_errno())
high = [ctypes.c_long(a) for a in (157, (1 << 32) | 4, 1, 0, 0, 0)]  # prctl: the option is 32 bits wide
print('set dumpable high bits', libc.syscall(*high), ctypes.get_errno())
print('dumpable', libc.prctl(3, 0, 0, 0, 0))
os.kill(child, 9)
""",
    "syscalls": """
import ctypes, platform
libc = ctypes.CDLL(None, use_errno=True)
def call(number, *args):
    result = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])
    return result, (ctypes.get_errno() if result == -1 else 0)
print('arch', platform.machine())
numbers = {'personality ADDR_NO_RANDOMIZE': (135, 0x0040000),
           'personality READ_IMPLIES_EXEC': (135, 0x0400000),
           'personality high bits': (135, (1 << 32) | 0x0040000), 'modify_ldt': (154, 0, 0, 0),
           'keyctl': (250, 0, 0, 0, 0, 0), 'add_key': (248, 0, 0, 0, 0, 0), 'request_key': (249, 0, 0, 0, 0),
           'bpf': (321, 0, 0, 0), 'userfaultfd': (323, 0), 'perf_event_open': (298, 0, 0, 0, 0, 0),
           'kexec_load': (246, 0, 0, 0, 0), 'mount': (165, 0, 0, 0, 0, 0), 'umount2': (166, 0, 0),
           'unshare': (272, 0x10000000), 'setns': (308, 0, 0), 'open_tree': (428, 0, 0, 0),
           'fsopen': (430, 0, 0), 'io_uring_setup': (425, 1, 0), 'ptrace': (101, 16, 1, 0, 0),
           'process_vm_writev': (311, 1, 0, 0, 0, 0, 0), 'open_by_handle_at': (304, 0, 0, 0),
           'kcmp': (312, 1, 1, 0, 0, 0), 'pidfd_getfd': (438, 0, 0, 0), 'iopl': (172, 3),
           'syslog': (103, 3, 0, 0), 'acct': (163, 0), 'swapon': (167, 0, 0), 'init_module': (175, 0, 0, 0)}
for name, (number, *args) in numbers.items():
    print(name, *call(number, *args))
print('personality query', *call(135, 0xFFFFFFFF))
""",
    "prefix": """
import os, sys
prefix = {prefix!r}
print(sorted(os.listdir(prefix)) if os.path.isdir(prefix) else 'no prefix')
binaries = os.path.join(prefix, 'bin')
print(sorted(os.listdir(binaries)) if os.path.isdir(binaries) else 'no bin')
print(sys.executable)
""",
    "exit_121": "import os\nos._exit(121)",
    "exit_137": "import os\nprint('bye', flush=True)\nos._exit(137)",
    "fake_sigxcpu": "import os, signal\nprint('TimeoutError: execution exceeded 3 s (killed)')\n"
                    "os.kill(os.getpid(), signal.SIGXCPU)",
    "cpu_total": """
import os
children = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        while True:
            pass
    children.append(pid)
print('ended', [os.waitpid(pid, 0)[1] for pid in children])
""",
    "outlive": """
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
# make init spin in its next select(): 'jmp .' over the first bytes of select in init's copy of libc (a fork
# of init has the same addresses), then wake it up
address = ctypes.cast(libc.select, ctypes.c_void_p).value
try:
    with open('/proc/1/mem', 'r+b', buffering=0) as memory:
        memory.seek(address)
        memory.write(bytes([0xEB, 0xFE]))
    os.kill(1, signal.SIGCHLD)
    print('init patched', flush=True)
except OSError as error:
    print('init untouched', type(error).__name__, flush=True)
for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGPIPE):
    signal.signal(number, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            time.sleep(0.05)
    os._exit(0)
time.sleep(0.1)
print('daemon started', flush=True)
while True:
    time.sleep(0.05)
""",
    "quick": "print('quick')",
    "orphaned": "import time\nprint('started', flush=True)\ntime.sleep(30)",  # bubblewrap is killed under it
    "namespaces": """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print('unshare user', libc.unshare(0x10000000), ctypes.get_errno())
print('unshare mount', libc.unshare(0x00020000), ctypes.get_errno())
print('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), ctypes.get_errno())
print('ptrace', libc.ptrace(16, 1, None, None), ctypes.get_errno())
""",
    "threads": ("import threading\nt = threading.Thread(target=lambda: None)\nt.start(); t.join()\n"
                "print('thread ok')"),
}


def render(name: str, params: dict) -> str:
    """The probe's code with ``{key!r}`` / ``{key}`` of each parameter filled in (no other brace is
    touched)."""
    code = PROBES[name]
    for key, value in params.items():
        code = code.replace("{" + key + "!r}", repr(value)).replace("{" + key + "}", str(value))
    return code


def run_probes(names, params: dict, tool_options: dict) -> dict:
    """{name: {"result", "elapsed"}} of each probe, or {"refused": message} when no sandbox can start."""
    from appo.tools.python_sandbox import PythonTool, SandboxUnavailable
    try:
        tool = PythonTool(**tool_options)
    except SandboxUnavailable as error:
        return {"refused": str(error)}
    results = {"_mode": tool.confinement.mode, "_memory_bound_mb": tool.memory_bound_mb}
    for name in names:
        probe_tool = PythonTool(**{**tool_options, **PROBE_OPTIONS[name]}) if name in PROBE_OPTIONS else tool
        start = time.monotonic()
        result = probe_tool.run(render(name, params))
        results[name] = {"result": result, "elapsed": time.monotonic() - start}
    return results


def processes() -> list[dict]:
    """Every process this process can see: pid, ppid, uid, state, whether its command line holds MARK."""
    from appo.tools.sandbox.supervisor import process_stats
    found = []
    for pid, fields in process_stats().items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                marked = MARK.encode() in file.read()
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        found.append({"pid": pid, "ppid": int(fields[1]), "uid": uid, "state": fields[0].decode(),
                      "marked": marked})
    return found


def leftovers(uids) -> dict:
    """What is left of this process's sandbox calls: its zombie children, live processes of this suite's
    sandboxes, and (root) any process, zombies included, owned by one of ``uids``."""
    table = processes()
    return {"zombie_children": [p["pid"] for p in table if p["ppid"] == os.getpid() and p["state"] == "Z"],
            "marked": [p["pid"] for p in table if p["marked"] and p["state"] != "Z"],
            "uid_owned": [p["pid"] for p in table if p["uid"] in uids]}


def outlive(request: dict) -> list[dict]:
    """As a child subreaper with the cgroup path off (and, as root, only ``request["uids"]`` uids): run
    ``OUTLIVE_CALLS``, each followed by a look at what is left of it."""
    import ctypes
    from appo.tools.python_sandbox import PythonTool
    from appo.tools.sandbox import cgroups, identities
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0, "PR_SET_CHILD_SUBREAPER"
    cgroups.layout = lambda: None
    uids = range(0)
    if request["uids"]:
        first, count = request["uids"]
        uids = identities.SANDBOX_UIDS = range(first, first + count)
    tool = PythonTool(**{**TOOL_OPTIONS, "timeout_s": OUTLIVE_TIMEOUT_S})
    report = []
    for name in OUTLIVE_CALLS:
        if name == "orphaned":  # bubblewrap dies first: its init becomes this process's child
            threading.Timer(0.5, _kill_children_named, args=("bwrap",)).start()
        start = time.monotonic()
        result = tool.run(render(name, {}))
        report.append({"name": name, "result": result, "elapsed": time.monotonic() - start,
                       "left": leftovers(set(uids))})
    time.sleep(0.2)
    report.append({"name": "end", "left": leftovers(set(uids))})
    return report


def _kill_children_named(name: str) -> None:
    for pid in [p["pid"] for p in processes() if p["ppid"] == os.getpid()]:
        try:
            with open(f"/proc/{pid}/comm") as file:
                if file.read().strip() == name:
                    os.kill(pid, 9)
        except OSError:
            pass


def _busy_trainer(threads: int = 21) -> None:
    stop = threading.Event()
    for _ in range(threads):
        threading.Thread(target=stop.wait, daemon=True).start()


def main() -> None:
    _busy_trainer()
    if sys.argv[1] == "run":
        request = json.load(sys.stdin)
        print(json.dumps(run_probes(request["names"], request["params"], request["tool"])), flush=True)
    elif sys.argv[1] == "outlive":
        print(json.dumps(outlive(json.load(sys.stdin))), flush=True)
    elif sys.argv[1] == "hold":
        from appo.tools.python_sandbox import PythonTool
        tool = PythonTool(**{**TOOL_OPTIONS, "timeout_s": 60})
        code = render("daemon", {}).replace("print('left a daemon behind')", "time.sleep(60)")
        threading.Thread(target=tool.run, args=(code,), daemon=True).start()
        time.sleep(1.5)
        print("ready", flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
