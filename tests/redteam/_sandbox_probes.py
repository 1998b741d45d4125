"""Probes for the sandbox red team: hostile code, run through PythonTool, from this process or as a script.

``python _sandbox_probes.py run`` reads {"names": [...], "params": {...}, "tool": {...}} as json on stdin,
starts 21 idle threads (a busy trainer), runs each named probe with ``PythonTool(**tool)`` and prints
{name: {"result", "elapsed"}} as json on its last line ({"refused": message} when the tool refuses to
start). ``python _sandbox_probes.py hold`` starts one long call whose code leaves a daemon, prints "ready"
and waits to be killed. The test module checks the results and the host (files, processes) afterwards.
"""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

TOOL_OPTIONS = {"timeout_s": 3.0, "memory_mb": 257, "disk_mb": 32, "max_processes": 8}
# the odd memory limit marks this suite's sandboxes: their command lines hold it (see sandbox_leftovers)
MARK = f'"RLIMIT_AS": {TOOL_OPTIONS["memory_mb"] * 2**20}'

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
try:
    socket.create_connection(('10.1.2.3', 80), timeout=1)
except OSError as error:
    print('outside', type(error).__name__, error.strerror)
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
address = struct.pack('<H', 2) + struct.pack('>H4s8x', {port}, bytes([127, 0, 0, 1]))
print('ctypes connect', libc.connect(fd, address, len(address)), ctypes.get_errno())
""",
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
    """The probe's code with ``{key!r}`` / ``{key}`` of each parameter filled in (no other brace is touched)."""
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
        start = time.monotonic()
        result = tool.run(render(name, params))
        results[name] = {"result": result, "elapsed": time.monotonic() - start}
    return results


def _busy_trainer(threads: int = 21) -> None:
    stop = threading.Event()
    for _ in range(threads):
        threading.Thread(target=stop.wait, daemon=True).start()


def main() -> None:
    _busy_trainer()
    if sys.argv[1] == "run":
        request = json.load(sys.stdin)
        print(json.dumps(run_probes(request["names"], request["params"], request["tool"])), flush=True)
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
