"""Run untrusted Python (a model's code completion) contained by the kernel, never in our process.

run_python is the one entry point, HumanEval's and that of any later stage that executes
model-written code. The program runs as `python -I`, its source read from stdin, inside
bubblewrap (`bwrap`, 0.8 or newer: the package `bubblewrap` of Debian, Ubuntu and Fedora, the
sandbox Flatpak runs its apps in), and gets no more than this:

- files: the whole file system read-only, in a mount namespace of its own, except /tmp, a fresh
  tmpfs of 64 MiB that is also its working directory and vanishes with it; a /dev of its own
  (null, zero, urandom...: no disks) and a /proc of its own, both read-only (a writable
  /proc/sys would let a program started by root set kernel parameters);
- processes: a PID namespace of its own, where it sees and can signal only itself; bwrap's init
  is PID 1 there and takes everything with it when the program ends, and bwrap dies with us
  (--die-with-parent). A seccomp filter refuses to create processes at all (fork, vfork, clone
  without CLONE_THREAD; threads still work), Unix-domain sockets (a daemon's socket file is a way
  out of any namespace) and io_uring (a side door around the filter);
- network: an empty network namespace of its own (a loopback that reaches nothing else), its own
  IPC, UTS, cgroup and user namespaces, as a user without capabilities (uid 65534 there) that can
  make no further user namespaces, with no new privileges;
- limits: wall time (at the deadline bwrap is killed, and the namespace with it), CPU time,
  address space, 16 MiB per file, no core dumps, and 64 processes and threads (RLIMIT_NPROC, set
  inside the namespace: outside, it would count every process of our user; the kernel exempts
  root's processes from it, hence the seccomp filter's refusal of forks).

bwrap rather than unshare and mount calls of our own: one small, widely reviewed program does the
order-sensitive part (the namespaces, a private root by pivot_root, mounts locked read-only,
capabilities dropped, PR_SET_NO_NEW_PRIVS, the PID 1 reaper, die-with-parent) in milliseconds,
where Python would need a helper process of its own between fork and exec (preexec_fn may not
mount or unshare safely in our threaded evaluator) and hundreds of lines to review.

Where bwrap is missing, too old, or the kernel refuses it user namespaces, run_python refuses
(ValueError, one line saying why and the fix) unless unsafe_exec is set (the --unsafe-exec flag):
the program then runs as before this sandbox, in a plain process of its own process group in a
temporary directory, under the same limits but the process count. Every program starts with GUARD
in both modes (Python-level refusals that ctypes gets around, the only barrier of --unsafe-exec),
so that its outcome does not depend on the mode. A program passes when it exits with status 0
before the deadline.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

TMP_BYTES = 64 * 2**20          # the private /tmp, the working directory: all a program may write
FILE_BYTES = 16 * 2**20         # each file it writes, its stderr too
PROCESSES = 64                  # RLIMIT_NPROC: processes and threads of the program's user in its namespace
ENV = {"PATH": "/usr/bin:/bin"}   # all the environment a program gets (-I ignores PYTHON* anyway)
UNSAFE_HINT = "or pass --unsafe-exec to run model-written code uncontained, on your own files and processes"

# Per machine (uname -m): seccomp's audit architecture and the numbers of the system calls the
# filter looks at; fork and vfork exist on x86-64 alone (elsewhere clone does their work).
SYSCALLS = {
    "x86_64": (0xC000003E, {"socket": 41, "clone": 56, "fork": 57, "vfork": 58, "io_uring_setup": 425, "clone3": 435}),
    "aarch64": (0xC00000B7, {"socket": 198, "clone": 220, "io_uring_setup": 425, "clone3": 435}),
}

# After the limits, the start of every program in both modes: the one barrier of --unsafe-exec, kept in
# the sandbox so that a program fails there as it would uncontained.
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


def run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, unsafe_exec: bool = False) -> Outcome:
    """Run program (Python source) in the sandbox, or uncontained with unsafe_exec; see the module
    docstring. ValueError (one line with the fix) where the sandbox cannot run and unsafe_exec is unset."""
    bwrap = None if unsafe_exec else require_containment()
    status, stderr = _execute(_preamble(timeout_s, memory_mb, contained=bwrap is not None) + program, timeout_s, bwrap)
    if status is None:
        return Outcome(False, "timed out")
    if status == 0:
        return Outcome(True, "passed")
    why = stderr[-1][:200] if stderr else f"exit status {status}"
    return Outcome(False, f"failed: {why}")


def require_containment() -> str:
    """The path of a bwrap that has contained a program here, else ValueError saying why and the fix;
    a command calls it before its work, to refuse at once rather than after generating the code."""
    return _working_bwrap(os.environ.get("PATH"))


@functools.cache
def _working_bwrap(search_path: str | None) -> str:
    """bwrap on search_path once it has run an empty program in the sandbox (kept per PATH; a failure
    is not kept, so a fix made meanwhile counts)."""
    bwrap = shutil.which("bwrap", path=search_path)
    if bwrap is None:
        raise ValueError("model-written code runs only inside bubblewrap, and bwrap is not on PATH: install it "
                         f"(apt-get install bubblewrap, or dnf install bubblewrap), {UNSAFE_HINT}")
    if platform.machine() not in SYSCALLS:
        raise ValueError(f"the sandbox's seccomp filter knows the system calls of {' and '.join(SYSCALLS)}, "
                         f"not those of this {platform.machine()}; {UNSAFE_HINT}")
    status, stderr = _execute("", 30.0, bwrap)
    if status != 0:
        why = stderr[-1] if stderr else f"exit status {status}"
        raise ValueError(f"bubblewrap could not start a sandbox here ({why}): it needs bwrap 0.8 or newer and "
                         "unprivileged user namespaces (sysctl user.max_user_namespaces above 0, and where they "
                         "exist kernel.unprivileged_userns_clone=1 and kernel.apparmor_restrict_unprivileged_userns=0 "
                         f"or an AppArmor profile for bwrap); {UNSAFE_HINT}")
    return bwrap


def _preamble(timeout_s: float, memory_mb: int, contained: bool) -> str:
    """The program's first lines: its rlimits, set in its own process (inside the namespaces, where
    RLIMIT_NPROC counts the sandbox's processes alone; the CPU time backs up the deadline), then GUARD."""
    memory, cpu = memory_mb * 2**20, int(timeout_s) + 1
    limits = {"AS": (memory, memory), "CPU": (cpu, cpu + 1), "FSIZE": (FILE_BYTES, FILE_BYTES), "CORE": (0, 0)}
    if contained:
        limits["NPROC"] = (PROCESSES, PROCESSES)
    set_limits = "".join(f"_resource.setrlimit(_resource.RLIMIT_{name}, {pair})\n" for name, pair in limits.items())
    return f"import resource as _resource\n{set_limits}del _resource\n{GUARD}"


@functools.cache
def _seccomp_filter() -> bytes:
    """The classic-BPF program bwrap --seccomp installs just before it starts the program: struct
    sock_filter records (code, jump if true, jump if false, constant) over struct seccomp_data, which
    holds the architecture at byte 4, the call's number at 0 and its first argument's low half at 16.
    EPERM: fork, vfork, clone without CLONE_THREAD, socket(AF_UNIX). ENOSYS: io_uring_setup, every call
    of another ABI (i386's, x32's on x86-64), and clone3, so that the C library falls back to clone,
    whose flags the filter can read (clone3's are behind a pointer)."""
    audit_arch, number = SYSCALLS[platform.machine()]
    load, jump_equal, jump_at_least, jump_any_bit, give = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS
    clone_thread, x32_bit = 0x10000, 0x40000000

    def op(code: int, k: int, if_true: int = 0, if_false: int = 0) -> bytes:
        return struct.pack("=HBBI", code, if_true, if_false, k)

    program = [op(load, 4), op(jump_equal, audit_arch, 1), op(give, enosys),
               op(load, 0), op(jump_at_least, x32_bit, 0, 1), op(give, enosys)]
    for name, answer in (("fork", eperm), ("vfork", eperm), ("io_uring_setup", enosys), ("clone3", enosys)):
        if name in number:
            program += [op(jump_equal, number[name], 0, 1), op(give, answer)]
    program += [op(jump_equal, number["clone"], 0, 4), op(load, 16),            # each block ends in a verdict
                op(jump_any_bit, clone_thread, 0, 1), op(give, allow), op(give, eperm),
                op(jump_equal, number["socket"], 0, 4), op(load, 16),
                op(jump_equal, socket.AF_UNIX, 0, 1), op(give, eperm), op(give, allow),
                op(give, allow)]
    return b"".join(program)


def _bwrap_command(bwrap: str, seccomp_fd: int) -> list[str]:
    """bwrap's command line for `python -I -` contained as the module docstring says."""
    interpreter = [arg for path in _hidden_by_tmp() for arg in ("--ro-bind", path, path)]
    return [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534",
            "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
            "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc", "--remount-ro", "/proc",
            "--size", str(TMP_BYTES), "--tmpfs", "/tmp", *interpreter, "--chdir", "/tmp",
            "--seccomp", str(seccomp_fd), "--", sys.executable, "-I", "-"]


def _hidden_by_tmp() -> list[str]:
    """The interpreter's own directories that the private /tmp would hide (a virtualenv made under
    /tmp, as CI's may be), to bind back read-only."""
    dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, os.path.dirname(sys.executable),
            os.path.dirname(os.path.realpath(sys.executable))}
    under_tmp = sorted(d for d in dirs if d.startswith("/tmp/"))
    return [d for d in under_tmp if not any(d.startswith(other + "/") for other in under_tmp)]   # outermost only


def _execute(source: str, timeout_s: float, bwrap: str | None) -> tuple[int | None, list[str]]:
    """Run source with `python -I -`, inside bwrap or (None) in a plain process in a temporary
    directory: its exit status (None at the deadline) and the last lines of its stderr."""
    with contextlib.ExitStack() as stack:
        stdin = stack.enter_context(tempfile.TemporaryFile())
        stderr = stack.enter_context(tempfile.TemporaryFile())   # capped by the size limit: no pipe to fill our memory
        stdin.write(source.encode("utf-8"))
        stdin.seek(0)
        if bwrap is None:
            command, fds = [sys.executable, "-I", "-"], ()
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="tritongpt-sandbox-"))
        else:
            read, write = os.pipe()
            stack.callback(os.close, read)
            os.write(write, _seccomp_filter())           # a few hundred bytes: the pipe holds them whole
            os.close(write)
            command, fds, cwd = _bwrap_command(bwrap, read), (read,), None
        proc = subprocess.Popen(command, cwd=cwd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr,
                                pass_fds=fds, start_new_session=True, env=ENV)
        # A timer kills at the deadline while we block in wait(): wait(timeout=) polls, with sleeps
        # growing to 50 ms, which added up to 50 ms to every program's time.
        timed_out = threading.Event()

        def at_deadline() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        deadline = threading.Timer(timeout_s, at_deadline)
        deadline.start()
        try:
            proc.wait()
        finally:
            deadline.cancel()
            _kill_group(proc.pid)        # what it left running (uncontained: in its process group)
            proc.wait()
        stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4096))
        lines = stderr.read().decode("utf-8", "replace").strip().splitlines()
    return None if timed_out.is_set() else proc.returncode, lines


def _kill_group(pid: int) -> None:
    """SIGKILL to the process group pid leads: bwrap and its init, whose end ends the namespace with
    everything in it; uncontained, the program and what it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
