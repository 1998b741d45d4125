"""The seccomp filter of the sandbox, built with libseccomp's Python bindings and handed to bubblewrap.

Default action: allow. Refused with EPERM: the system calls that Docker's default seccomp profile withholds
from an unprivileged container and that a script never needs (mounts and namespaces, kernel modules, kexec,
reboot, swap, clocks, tracing other processes, BPF, perf, keyrings, file handles, io_uring, userfaultfd), plus
what would hold memory outside the sandbox's budget when no cgroup enforces one (memfd_create, SysV shared
memory and message queues, POSIX message queues). ``clone`` with any namespace flag is refused as well, and
``clone3`` (whose flags a filter cannot read) answers ENOSYS, so that libc falls back to ``clone``. System calls
of other ABIs (x32, i386) are refused by libseccomp's architecture check.

The bindings are libseccomp's own ``seccomp`` module (Debian: python3-seccomp) or ``pyseccomp`` (PyPI, the same
API over ctypes), whichever imports.
"""

from __future__ import annotations

import errno
import functools
import tempfile

DENIED = (
    # mounts, namespaces, root changes
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon",
    "swapoff", "syslog", "acct", "quotactl", "quotactl_fd", "iopl", "ioperm", "uselib", "ustat", "sysfs",
    "_sysctl", "vhangup", "lookup_dcookie", "nfsservctl",
    # clocks
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    # other processes, tracing, BPF, keyrings, file handles
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "perf_event_open", "bpf",
    "fanotify_init", "add_key", "request_key", "keyctl", "open_by_handle_at", "name_to_handle_at",
    # newer attack surface
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # memory that no rlimit counts
    "memfd_create", "memfd_secret", "shmget", "shmat", "msgget", "mq_open",
    # NUMA placement (needs CAP_SYS_NICE in Docker's profile)
    "mbind", "set_mempolicy", "migrate_pages", "move_pages",
)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
                   0x00000080)  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME


def _bindings():
    try:
        import seccomp
    except ImportError:
        import pyseccomp as seccomp
    return seccomp


def available() -> str | None:
    """None when a filter can be built here, else the reason it cannot."""
    try:
        filter_program()
    except ImportError:
        return "no libseccomp Python bindings (pip install pyseccomp, or apt-get install python3-seccomp)"
    except Exception as error:  # noqa: BLE001 - libseccomp missing or refusing: say what it said
        return f"libseccomp could not build the filter: {type(error).__name__}: {error}"
    return None


@functools.lru_cache(maxsize=1)
def filter_program() -> bytes:
    """The compiled BPF program (bytes) for bubblewrap's ``--seccomp FD``; built once per process."""
    seccomp = _bindings()
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError, OSError):  # not a system call of this architecture
            continue
    for flag in NAMESPACE_FLAGS:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as file:
        rules.export_bpf(file)
        file.seek(0)
        return file.read()
