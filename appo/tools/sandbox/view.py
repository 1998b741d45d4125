"""The file system a sandbox sees: the running interpreter, its stdlib and site-packages, the shared libraries
they load, and a handful of devices; nothing else of the host (no /etc, no /home, no /root beyond the
interpreter's own folder, no host /tmp). Everything is read-only; only /tmp (the working directory, a
size-limited tmpfs that /dev/shm points to) is writable.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig

LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
_SYSTEM_PREFIXES = ("/", "/usr", "/usr/local")


@functools.lru_cache(maxsize=1)
def site_packages() -> tuple[str, ...]:
    """The site-packages folders of the running interpreter (a venv's own, when in one)."""
    paths = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return tuple(p for p in dict.fromkeys(paths) if p and os.path.isdir(p))


@functools.lru_cache(maxsize=1)
def interpreter_paths() -> tuple[str, ...]:
    """Host paths to bind read-only for ``sys.executable`` to run with its stdlib and site-packages: the
    prefixes (a venv's and its base interpreter's), or for a system interpreter its own folders; no path
    inside another."""
    paths = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        if os.path.realpath(prefix) not in _SYSTEM_PREFIXES:
            paths.add(os.path.abspath(prefix))
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_path(name))
    paths.update(site_packages())
    paths.add(os.path.realpath(sys.executable))
    paths.add(sys.executable)
    library = sysconfig.get_config_var("LIBDIR")
    if library and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        paths.add(library)
    existing = sorted(os.path.abspath(p) for p in paths if p and os.path.exists(p))
    kept: list[str] = []
    for path in existing:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(kept)


def bwrap_view_args(programs: tuple[str, ...] = ()) -> list[str]:
    """bubblewrap arguments that build the view (before ``--remount-ro /``): library folders as on the host
    (a symlink stays a symlink), the interpreter's paths and ``programs`` with world-readable parents, /proc
    of the sandbox's own PID namespace, and the devices."""
    args: list[str] = []
    made: set[str] = {"/"}

    def parents(path: str) -> None:
        parent = os.path.dirname(path)
        if parent not in made:
            parents(parent)
            args.extend(["--perms", "0755", "--dir", parent])
            made.add(parent)

    for directory in LIBRARY_DIRS:
        if os.path.islink(directory):
            parents(directory)
            args.extend(["--symlink", os.readlink(directory), directory])
        elif os.path.isdir(directory):
            parents(directory)
            args.extend(["--ro-bind", directory, directory])
        made.add(directory)
    for path in (*interpreter_paths(), *programs):
        if any(path == d or path.startswith(d + "/") for d in LIBRARY_DIRS):
            continue  # already in view
        parents(path)
        args.extend(["--ro-bind", path, path])
    args.extend(["--proc", "/proc", "--perms", "0755", "--dir", "/dev"])
    for device in DEVICES:
        args.extend(["--dev-bind", device, device])
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        args.extend(["--symlink", target, f"/dev/{name}"])
    return args
