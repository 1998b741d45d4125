"""Confinement for model-written code, built on bubblewrap, libseccomp and cgroups.

``bwrap.py``: the two modes (root, user namespace) and the command line; ``view.py``: what the sandbox sees;
``seccomp_filter.py``: the system calls it may not make; ``cgroups.py``: one memory and task budget per call;
``identities.py``: uids leased across processes (root mode); ``child.py``: the script that runs inside.
``appo.tools.python_sandbox.PythonTool`` puts them together.
"""

from appo.tools.sandbox.bwrap import Confinement, SandboxUnavailable, detect

__all__ = ["Confinement", "SandboxUnavailable", "detect"]
