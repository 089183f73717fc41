"""Run untrusted Python (a model's code completion) in its own process, never in ours.

Each program runs as `python -I` in a fresh empty directory, with a minimal environment and no
stdin, under these limits, set in the child between fork and exec:

- wall time: the whole process group is killed at the deadline (a CPU-time rlimit backs it up);
- memory: RLIMIT_AS caps the address space, so a runaway allocation fails with MemoryError;
- files: RLIMIT_FSIZE caps every file it writes, RLIMIT_CORE 0 keeps crashes from dumping core;
- network: a new, empty network namespace (unshare(CLONE_NEWUSER | CLONE_NEWNET), allowed to
  unprivileged users on most Linux systems) where no address but an unconfigured loopback exists;
  where the kernel refuses that, the program still starts with socket creation disabled in Python
  (a guard that ctypes could get around; `network_isolated()` says which one applies);
- processes: fork, exec and subprocess are disabled in Python by the same guard, and the process
  group's kill takes any child along;
- the file system is not a separate namespace: the guard disables Python's deleting, renaming and
  permission calls, and each file written is capped at 16 MiB, but a program could still write
  where our user may. Run the evaluation as an unprivileged user for more.

A program passes when it exits with status 0 before the deadline.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Prepended to every program: what the namespace cannot take away, Python can still refuse.
GUARD = """\
import os as _os, shutil as _shutil, socket as _socket, subprocess as _subprocess
def _refuse(*args, **kwargs):
    raise PermissionError("disabled in the sandbox")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket, _name, _refuse)
for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "spawnv",
              "spawnve", "kill", "killpg", "putenv", "chdir", "chmod", "chown", "remove", "unlink", "rmdir",
              "removedirs", "rename", "renames", "replace", "truncate", "symlink", "link"):
    if hasattr(_os, _name):
        setattr(_os, _name, _refuse)
_shutil.rmtree = _shutil.move = _subprocess.Popen = _refuse
del _os, _shutil, _socket, _subprocess, _name
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str          # "passed", "timed out", or "failed: " and the last line of stderr


_LIBC = ctypes.CDLL(None, use_errno=True)


def _unshare_network() -> None:
    """Move the calling process into new user and network namespaces (OSError where refused)."""
    if _LIBC.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNET) refused")


@functools.cache
def network_isolated() -> bool:
    """Whether programs get their own empty network namespace here (probed once, in a child: an
    exception in preexec_fn comes back to the parent as SubprocessError)."""
    try:
        return subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_unshare_network, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limit(timeout_s: float, memory_mb: int, isolate: bool):
    """The child's setup between fork and exec."""
    def setup() -> None:
        if isolate:
            _unshare_network()
        memory = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return setup


def run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run program (Python source) in a sandboxed process; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="tritongpt-sandbox-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(GUARD + program)
        # stderr goes to a file the size limit caps, not to a pipe that could fill our memory
        with open(os.path.join(work, "stderr"), "w+b") as err:
            proc = subprocess.Popen([sys.executable, "-I", path], cwd=work, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                    env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"},
                                    preexec_fn=_limit(timeout_s, memory_mb, network_isolated()))
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return Outcome(False, "timed out")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)     # the program, and whatever it left running
                proc.wait()
            err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
            lines = err.read().decode("utf-8", "replace").strip().splitlines()
    if proc.returncode == 0:
        return Outcome(True, "passed")
    why = lines[-1][:200] if lines else f"exit status {proc.returncode}"
    return Outcome(False, f"failed: {why}")
