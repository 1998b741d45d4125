"""How model code is confined here: bubblewrap namespaces, a seccomp filter, an unprivileged identity.

Two modes, picked by who runs appo:
  root     bwrap (as root, no user namespace) keeps only CAP_SETUID, CAP_SETGID and CAP_SETPCAP for
           util-linux's ``setpriv``, which switches to a uid leased from ``identities.SANDBOX_UIDS`` and
           clears every capability set (bounding and inheritable included) before the interpreter starts.
  userns   bwrap (as an ordinary user) creates a user namespace; the code runs as the same uid inside it,
           with no capabilities, and may not create further user namespaces.
Both: new PID, network (no interface up), IPC, UTS and (where supported) cgroup namespaces; the view of
``view.py``, remounted read-only; a size-limited tmpfs as /tmp; the seccomp filter of ``seccomp_filter.py``;
``--die-with-parent`` (SIGKILL down the chain when the parent dies, even by SIGKILL); the child script as
PID 1, whose exit kills every process left in the namespace; ``--info-fd``, on which bubblewrap tells the
parent the pid of that PID 1 (the parent ends the call by killing it, see supervisor.py).

``detect()`` finds the mode once per process and proves it by starting one sandbox; it raises
``SandboxUnavailable`` (naming what is missing) where no confinement works.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from appo.tools.sandbox import seccomp_filter
from appo.tools.sandbox.view import bwrap_view_args, interpreter, site_packages

CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
INNER_DIR = "/.appo"
_SEARCH_PATH = "/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin"
# bubblewrap options the sandbox cannot do without (--size, for the /tmp budget, came in bubblewrap 0.7)
REQUIRED_OPTIONS = ("--size", "--perms", "--as-pid-1", "--ro-bind-data", "--die-with-parent", "--seccomp",
                    "--remount-ro", "--cap-drop")


class SandboxUnavailable(RuntimeError):
    """No confinement mechanism works on this machine; the message says what is missing."""


@dataclass(frozen=True)
class Confinement:
    """mode: "root" or "userns"; bwrap / setpriv: the programs' paths (setpriv only in root mode);
    disable_userns: bubblewrap can forbid new user namespaces itself (0.8+; the seccomp filter does
    anyway)."""

    mode: str
    bwrap: str
    setpriv: str | None = None
    disable_userns: bool = False

    def command(self, *, config: dict, code_fd: int, seccomp_fd: int, disk_bytes: int,
                uid: int | None = None, info_fd: int | None = None) -> list[str]:
        """The argv that runs ``child.py`` on the code read from ``code_fd`` (an open file, read by bwrap),
        with the filter read from ``seccomp_fd``. uid: the leased sandbox uid (root mode only); info_fd: where
        bubblewrap writes the pid of the sandbox's init (json); config: child.py's settings (its "status" and
        "lifeline" descriptors, its "limits")."""
        if (self.mode == "root") != (uid is not None):
            raise ValueError("uid: required in root mode and only there")
        argv = [self.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1",
                "--hostname", "sandbox", *(["--info-fd", str(info_fd)] if info_fd is not None else [])]
        if self.mode == "root":
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                     "--cap-add", "CAP_SETPCAP"]
        else:
            argv += ["--unshare-user", *(["--disable-userns"] if self.disable_userns else []),
                     "--cap-drop", "ALL"]
        programs = (self.setpriv,) if self.mode == "root" else ()
        argv += ["--seccomp", str(seccomp_fd), *bwrap_view_args(programs, tmp_bytes=disk_bytes),
                 "--perms", "0755", "--dir", INNER_DIR,
                 "--ro-bind", CHILD_SCRIPT, f"{INNER_DIR}/child.py",
                 "--perms", "0444", "--ro-bind-data", str(code_fd), f"{INNER_DIR}/code.py",
                 "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
        for name, value in sandbox_environment("/tmp").items():
            argv += ["--setenv", name, value]
        argv.append("--")
        if self.mode == "root":
            argv += [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                     "--bounding-set=-all", "--"]
        inner = {"status": None, "lifeline": None, **config, "code_path": f"{INNER_DIR}/code.py",
                 "workdir": "/tmp", "audit_hook": False, "site": list(site_packages())}
        return argv + [interpreter(), "-I", "-S", "-B", f"{INNER_DIR}/child.py", repr(inner)]


def sandbox_environment(home: str) -> dict[str, str]:
    """The whole environment of sandboxed code (nothing of the parent's leaks in)."""
    return {"PATH": os.path.dirname(interpreter()), "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def data_fd(data: bytes) -> int:
    """A readable fd holding ``data`` from offset 0 (an anonymous memory file in the parent)."""
    fd = os.memfd_create("appo-sandbox", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@functools.lru_cache(maxsize=None)
def detect(as_root: bool | None = None) -> Confinement:
    """The confinement of this machine for this user (cached), proven by one sandbox start.

    Raises SandboxUnavailable naming what is missing: bubblewrap, setpriv (root), the seccomp bindings, or the
    kernel's permission (e.g. unprivileged user namespaces disabled)."""
    as_root = os.geteuid() == 0 if as_root is None else as_root
    search = os.environ.get("PATH", "") + os.pathsep + _SEARCH_PATH
    bwrap = shutil.which("bwrap", path=search)
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed (apt-get install bubblewrap)")
    setpriv = shutil.which("setpriv", path=search) if as_root else None
    if as_root and setpriv is None:
        raise SandboxUnavailable("setpriv (util-linux) is not installed (apt-get install util-linux)")
    reason = seccomp_filter.available()
    if reason is not None:
        raise SandboxUnavailable(reason)
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SandboxUnavailable(f"{bwrap} --help failed: {error}") from None
    missing = [option for option in REQUIRED_OPTIONS if option not in usage]
    if missing:
        raise SandboxUnavailable(f"{bwrap} is too old: no {', '.join(missing)} (bubblewrap >= 0.7 needed)")
    confinement = Confinement("root" if as_root else "userns", bwrap, setpriv, "--disable-userns" in usage)
    _prove(confinement)
    return confinement


def _prove(confinement: Confinement) -> None:
    """Start one sandbox that runs ``pass``; SandboxUnavailable with bwrap's own words when it cannot."""
    code_fd, seccomp_fd = data_fd(b"pass\n"), data_fd(seccomp_filter.filter_program())
    try:
        argv = confinement.command(config={"limits": {}}, code_fd=code_fd, seccomp_fd=seccomp_fd,
                                   disk_bytes=1 << 20, uid=65534 if confinement.mode == "root" else None)
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              pass_fds=(code_fd, seccomp_fd))
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SandboxUnavailable(f"bubblewrap could not start: {error}") from None
    finally:
        os.close(code_fd)
        os.close(seccomp_fd)
    if done.returncode != 0:
        words = (done.stderr or done.stdout).decode(errors="replace").strip()[-500:]
        hint = "" if confinement.mode == "root" else (
            " (a non-root user needs unprivileged user namespaces: sysctl user.max_user_namespaces > 0, "
            "and kernel.unprivileged_userns_clone=1 or kernel.apparmor_restrict_unprivileged_userns=0 "
            "where those exist; or run as root)")
        raise SandboxUnavailable(f"bubblewrap could not build a sandbox ({confinement.mode} mode): "
                                 f"{words}{hint}")
