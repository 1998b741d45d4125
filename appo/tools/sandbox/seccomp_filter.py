"""The seccomp filter of the sandbox, built with libseccomp's Python bindings and handed to bubblewrap.

Default action: allow. Refused, with the reference being Docker's default seccomp profile (what it withholds
from a container without added capabilities), and stricter where a script has no use for a call:

- ``DENIED`` (EPERM): mounts and namespaces, kernel modules, kexec, reboot, swap, clocks, the LDT, tracing or
  comparing other processes, BPF, perf, keyrings, file handles, io_uring, userfaultfd, obsolete calls; plus
  what would hold memory outside the sandbox's budget when no cgroup enforces one (memfd_create, SysV shared
  memory and message queues, POSIX message queues).
- ``clone`` with any namespace flag (EPERM); ``clone3``, whose flags a filter cannot read, answers ENOSYS so
  that libc falls back to ``clone``.
- ``personality`` except the values Docker allows (``PERSONALITY_ALLOWED``: Linux, 32-bit Linux, UNAME26, and
  the query 0xffffffff): no ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, other ABIs (EPERM).
- sockets of any family but AF_UNIX (``SOCKET_FAMILY``), for ``socket`` and ``socketpair``
  (EAFNOSUPPORT): the sandbox's network namespace is empty, and some families (AF_VSOCK to a hypervisor,
  AF_ALG, AF_PACKET, netlink) reach the kernel or the host whatever the namespace.
- ``prctl(PR_SET_DUMPABLE, v)`` with v != 0 (EPERM): the sandbox's init makes itself non-dumpable before
  the code runs, and no process may undo that for itself, so no process of a call can open another's
  /proc/<pid>/mem (or fd, environ, maps) for writing or reading (see child.py).

System calls of other ABIs (x32, i386) are refused by libseccomp's architecture check. Integer arguments the
kernel reads as 32 bits are compared on their low 32 bits (or refused when the high bits are set), so a
caller cannot slip a value past the filter in the upper half.

The bindings are libseccomp's own ``seccomp`` module (Debian: python3-seccomp) or ``pyseccomp`` (PyPI, the
same API over ctypes), whichever imports.
"""

from __future__ import annotations

import errno
import functools
import tempfile

DENIED = (
    # mounts, namespaces, root changes
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns", "mount_setattr", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms", "query_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "syslog", "acct", "quotactl",
    "quotactl_fd", "iopl", "ioperm", "modify_ldt", "vm86", "vm86old", "uselib", "ustat", "sysfs", "_sysctl",
    "vhangup", "lookup_dcookie", "nfsservctl",
    # clocks
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex",
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
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # PER_LINUX, PER_LINUX32, UNAME26, query
SOCKET_FAMILY = 1  # AF_UNIX, the one family a socket may have
PR_SET_DUMPABLE = 4
_LOW32 = 0xFFFFFFFF


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


def personality_masks() -> list[tuple[int, int]]:
    """(mask, value) pairs: ``personality(p)`` is refused when ``p & mask == value`` for any pair, which holds
    exactly for the 32-bit values outside ``PERSONALITY_ALLOWED`` (libseccomp takes one comparison per
    argument and rule, so "not one of these" becomes a union of two-bit tests).

    A refused value has a bit b outside the allowed bits set and is not the all-ones query, so some bit c is
    clear: the pair (b set, c clear). Bits 0 and 1 (both outside) stand in for c, or for b when both are
    set."""
    allowed_bits = 0
    for value in PERSONALITY_ALLOWED[:-1]:
        allowed_bits |= value
    outside = [b for b in range(32) if not allowed_bits >> b & 1]
    pairs = {(b, c) for b in outside for c in (0, 1) if c != b}  # b set, bit 0 or 1 clear
    pairs |= {(0, c) for c in range(1, 32)}  # bit 0 set (so are the others tried above): any bit clear
    return sorted(((1 << b) | (1 << c), 1 << b) for b, c in pairs)


@functools.lru_cache(maxsize=1)
def filter_program() -> bytes:
    """The compiled BPF program (bytes) for bubblewrap's ``--seccomp FD``; built once per process."""
    seccomp = _bindings()
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            rules.add_rule(eperm, name)
        except (ValueError, RuntimeError, OSError):  # not a system call of this architecture
            continue
    for flag in NAMESPACE_FLAGS:
        rules.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for mask, value in personality_masks():
        rules.add_rule(eperm, "personality", seccomp.Arg(0, seccomp.MASKED_EQ, mask, value))
    for name in ("socket", "socketpair"):  # any 64-bit value but exactly AF_UNIX is refused
        rules.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), name, seccomp.Arg(0, seccomp.NE, SOCKET_FAMILY))
    rules.add_rule(eperm, "prctl", seccomp.Arg(0, seccomp.MASKED_EQ, _LOW32, PR_SET_DUMPABLE),
                   seccomp.Arg(1, seccomp.NE, 0))
    with tempfile.TemporaryFile() as file:
        rules.export_bpf(file)
        file.seek(0)
        return file.read()
