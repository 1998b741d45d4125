"""Sandbox user ids for a root parent, leased safely across threads and processes.

A root parent runs each sandbox under its own unprivileged uid from ``SANDBOX_UIDS`` (no passwd entry
needed), so that the kernel's per-user process limit counts that sandbox's processes only. A uid is leased by
an exclusive ``flock`` on ``<lock_dir>/<uid>.lock``: the lock belongs to the open file, so two threads, or two
appo processes, never hold the same uid at once, and a process that dies (even by SIGKILL) releases its
leases with its file descriptors. A uid that still owns a process (a zombie included: the kernel counts it
until it is reaped) is skipped; the parent ends every call with its uid free (see supervisor.py), so that
happens only after an appo process was SIGKILLed mid-call, until its sandbox's init has exited. A non-root
parent needs none of this: its sandboxes get their own user namespace.
"""

from __future__ import annotations

import fcntl
import os
import random
import stat

SANDBOX_UIDS = range(900_000, 901_024)
LOCK_DIR = "/run/appo-sandbox-uids"


class UidLease:
    """``with UidLease() as uid:`` holds one uid of ``uids`` for the block (RuntimeError when all are taken).
    uids / lock_dir: None reads this module's ``SANDBOX_UIDS`` / ``LOCK_DIR`` when the lease is made."""

    def __init__(self, uids: range | None = None, lock_dir: str | None = None):
        self.uids = SANDBOX_UIDS if uids is None else uids
        self.lock_dir = LOCK_DIR if lock_dir is None else lock_dir
        self.uid: int | None = None
        self._fd: int | None = None

    def __enter__(self) -> int:
        directory = _private_directory(self.lock_dir)
        start = random.randrange(len(self.uids))  # spread concurrent callers over the range
        busy = None
        for i in range(len(self.uids)):
            uid = self.uids[(start + i) % len(self.uids)]
            fd = os.open(os.path.join(directory, f"{uid}.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            busy = uids_with_processes(include_zombies=True) if busy is None else busy
            if uid in busy:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return uid
        raise RuntimeError(f"all {len(self.uids)} sandbox uids are in use (locks in {directory})")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
        self.uid, self._fd = None, None


def uids_with_processes(include_zombies: bool = False) -> set[int]:
    """The uids that own a process on this host (zombies left out unless asked for)."""
    owners = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if not include_zombies:
                with open(f"/proc/{name}/stat", "rb") as file:
                    if file.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
            owners.add(os.stat(f"/proc/{name}").st_uid)
        except (OSError, IndexError):
            pass
    return owners


def _private_directory(path: str) -> str:
    """Create ``path`` (mode 700) if needed; refuse one that another user could tamper with."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{path}: expected a directory owned by uid {os.geteuid()} and writable only "
                           f"by it")
    return path
