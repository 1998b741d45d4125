"""The file system a sandbox sees: what the running interpreter needs to start and import its packages, and
a handful of devices; nothing else of the host.

In view, read-only: the interpreter binary (symlinks resolved: a venv's ``python`` is a link to its base
interpreter), its shared libpython when it was built shared, its stdlib (with lib-dynload), the
site-packages folders of the running interpreter (a venv's own, and its base's when the venv includes them),
and the host's library folders (``LIBRARY_DIRS``, for the shared libraries the interpreter and extension
modules load). Not in view: the rest of the interpreter's prefix (its bin/, include/, share/, a venv's
pyvenv.cfg and pip.conf), /etc, /home, /root, the host's /tmp. Writable: only /tmp (the working directory, a
size-limited tmpfs that /dev/shm points to).

The interpreter may live anywhere, the host's /tmp included: the sandbox's /tmp is mounted first and the
interpreter's folders are bound on top of it, read-only, at their host paths.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig

LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def interpreter() -> str:
    """The interpreter binary the sandbox runs: ``sys.executable`` with symlinks resolved, so that it finds
    its stdlib from where the binary really lives (the site-packages come from the parent, see child.py)."""
    return os.path.realpath(sys.executable)


@functools.lru_cache(maxsize=1)
def site_packages() -> tuple[str, ...]:
    """The site-packages folders of the running interpreter (a venv's own, when in one)."""
    paths = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return tuple(p for p in dict.fromkeys(paths) if p and os.path.isdir(p))


@functools.lru_cache(maxsize=1)
def interpreter_paths() -> tuple[str, ...]:
    """Host paths to bind read-only for ``interpreter()`` to run with its stdlib and site-packages, sorted,
    none inside another: the binary, libpython (shared builds), the stdlib folders, the site-packages."""
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
                                     "installed_base": sys.base_prefix,
                                     "installed_platbase": sys.base_exec_prefix})
    paths = {interpreter(), base["stdlib"], base["platstdlib"], *site_packages()}
    library, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if library and soname and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        paths.add(os.path.join(library, soname))
    existing = sorted(os.path.abspath(p) for p in paths if p and os.path.exists(p))
    kept: list[str] = []
    for path in existing:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(kept)


def bwrap_view_args(programs: tuple[str, ...] = (), tmp_bytes: int | None = None) -> list[str]:
    """bubblewrap arguments that build the view (before ``--remount-ro /``): the private /tmp (a tmpfs of
    ``tmp_bytes``, mode 1777) first, then library folders as on the host (a symlink stays a symlink), the
    interpreter's paths and ``programs`` with world-readable parents, /proc of the sandbox's own PID
    namespace, and the devices."""
    args: list[str] = []
    made: set[str] = {"/"}
    if tmp_bytes is not None:
        args += ["--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
        made.add("/tmp")

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
