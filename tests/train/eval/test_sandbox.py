"""train.eval.sandbox: untrusted code runs contained by bubblewrap (or, with --unsafe-exec, in a
plain limited process); whatever it does, we get an outcome, nothing outside the sandbox changes,
and the evaluating process keeps running.

The attacks go around the Python-level guard, through libc with ctypes, as a completion could.
A file they target lies where the sandbox can see it, under $HOME, not under /tmp (the sandbox's
/tmp is a fresh one of its own); each attack reports `errno N` (or `done`) as its last line.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from train.eval import sandbox
from train.eval.sandbox import TMP_BYTES, run_python

REPO = Path(__file__).resolve().parents[3]
LIBC = "import ctypes, os, sys, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def why_not() -> str | None:
    try:
        sandbox.require_containment()
    except ValueError as e:
        return str(e)
    return None


WHY_NOT = why_not()
contained = pytest.mark.skipif(WHY_NOT is not None, reason=f"the sandbox cannot run here: {WHY_NOT}")
MODES = [pytest.param(False, id="contained", marks=contained), pytest.param(True, id="unsafe-exec")]


def libc_call(call: str) -> str:
    """A program making one libc call: it ends `errno N` when the call fails, `done` when it succeeds."""
    return LIBC + f"sys.exit('done' if ({call}) >= 0 else f'errno {{ctypes.get_errno()}}')\n"


def python_call(statement: str) -> str:
    """A program running one Python statement: it ends `errno N` when that raises OSError, else `done`."""
    return (f"import os, sys\ntry:\n    {statement}\n"
            "except OSError as e:\n    sys.exit(f'errno {e.errno}')\nsys.exit('done')\n")


def named(marker: str, within_s: float = 2.0) -> list[int]:
    """The processes whose name (prctl PR_SET_NAME) is marker, after waiting up to within_s for them to go."""
    deadline = time.monotonic() + within_s
    while True:
        found = []
        for comm in Path("/proc").glob("[0-9]*/comm"):
            try:
                if comm.read_text().strip() == marker:
                    found.append(int(comm.parent.name))
            except OSError:
                continue                             # it ended while we looked
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def name_it(marker: str) -> str:
    return f"libc.prctl(15, {marker.encode()!r}, 0, 0, 0)\n"      # PR_SET_NAME: findable in /proc/PID/comm


@pytest.fixture
def outside():
    """A directory the sandbox can see but not change, holding victim.txt."""
    with tempfile.TemporaryDirectory(dir=Path.home(), prefix=".tritongpt-sandbox-test-") as directory:
        victim = Path(directory) / "victim.txt"
        victim.write_text("precious")
        victim.chmod(0o644)
        yield Path(directory)


@pytest.mark.parametrize("unsafe_exec", MODES)
def test_exit_status_decides(unsafe_exec):
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]", unsafe_exec=unsafe_exec).passed
    outcome = run_python("assert 1 + 1 == 3, 'wrong sum'", unsafe_exec=unsafe_exec)
    assert not outcome.passed and outcome.result == "failed: AssertionError: wrong sum"


@pytest.mark.parametrize("unsafe_exec", MODES)
def test_an_infinite_loop_is_killed_at_the_deadline(unsafe_exec):
    start = time.perf_counter()
    outcome = run_python("while True:\n    pass\n", timeout_s=1.0, unsafe_exec=unsafe_exec)
    assert outcome.result == "timed out" and time.perf_counter() - start < 5


@pytest.mark.parametrize("unsafe_exec", MODES)
def test_a_crash_and_a_runaway_allocation_are_failures(unsafe_exec):
    # bwrap's init reports a program killed by signal 6 as status 128 + 6, a plain process as -6
    assert run_python("import os\nos.abort()", unsafe_exec=unsafe_exec).result in ("failed: exit status 134",
                                                                                   "failed: exit status -6")
    recursion = "import sys\nsys.setrecursionlimit(10**6)\ndef f(n): return f(n + 1)\nf(0)"
    assert run_python(recursion, unsafe_exec=unsafe_exec).passed is False
    allocation = run_python("x = bytearray(8 * 2**30)", memory_mb=512, unsafe_exec=unsafe_exec)
    assert allocation.result == "failed: MemoryError"


@pytest.mark.parametrize("unsafe_exec", MODES)
def test_a_flood_of_output_is_bounded(unsafe_exec):
    outcome = run_python("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n", timeout_s=5.0,
                         unsafe_exec=unsafe_exec)
    assert not outcome.passed and len(outcome.result) < 300


@pytest.mark.parametrize("unsafe_exec", MODES)
def test_processes_and_sockets_are_refused_in_python(unsafe_exec):
    for source in ("import socket\nsocket.create_connection(('127.0.0.1', 80))",
                   "import subprocess\nsubprocess.run(['true'])", "import os\nos.fork()", "import os\nos.remove('x')"):
        assert run_python(source, unsafe_exec=unsafe_exec).result == "failed: PermissionError: disabled in the sandbox"


def test_without_bwrap_it_refuses_in_one_line_unless_unsafe_exec(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))               # an empty directory: no bwrap on PATH
    with pytest.raises(ValueError, match=r"bwrap is not on PATH: install it \(apt-get install bubblewrap.*--unsafe-ex"):
        run_python("pass")
    assert run_python("pass", unsafe_exec=True).passed


def test_a_bwrap_that_cannot_start_is_refused_with_its_reason(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(ValueError) as refusal:
        run_python("pass")
    message = str(refusal.value)
    assert "\n" not in message and "(bwrap: No permissions to create new namespace)" in message
    assert "unprivileged user namespaces" in message and "--unsafe-exec" in message


@contained
def test_the_program_has_a_private_working_directory_and_tmp():
    source = ("import os, sys\nopen('result', 'w').write('ok')\nopen('/tmp/scratch', 'w').write('ok')\n"
              "sys.exit(f'{os.getcwd()} {sorted(os.listdir())} {sorted(os.listdir(\"/tmp\"))}')\n")
    # Besides what it writes, only the mount points of an interpreter installed under /tmp (read-only).
    seen = sorted(["result", "scratch"] + [Path(d).relative_to("/tmp").parts[0] for d in sandbox._hidden_by_tmp()])
    assert run_python(source).result == f"failed: /tmp {seen} {seen}"


@contained
@pytest.mark.parametrize("how", ["open", "os.open", "ctypes"])
@pytest.mark.parametrize("where", ["/tmp", "repository", "home dotfile"])
def test_writes_outside_the_working_directory_leave_no_trace(where, how):
    name = f"sandbox-probe-{uuid.uuid4().hex}"
    path = {"/tmp": Path("/tmp") / name, "repository": REPO / name, "home dotfile": Path.home() / f".{name}"}[where]
    source = {"open": python_call(f"open({str(path)!r}, 'w').write('pwned')"),
              "os.open": python_call(f"os.write(os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT), b'pwned')"),
              "ctypes": libc_call(f"libc.open({bytes(path)!r}, os.O_WRONLY | os.O_CREAT, 0o644)")}[how]
    try:
        outcome = run_python(source)
        assert not path.exists()
    finally:
        path.unlink(missing_ok=True)
    # /tmp is the sandbox's own, where the write succeeds; the rest of the file system is read-only. A
    # repository checked out under /tmp (as CI's may be) is hidden by the private /tmp: no such directory.
    parent = path.resolve().parent
    expected = ("failed: done" if parent == Path("/tmp") else "failed: errno 2" if parent.is_relative_to("/tmp")
                else "failed: errno 30")
    assert outcome.result == expected


@contained
@pytest.mark.parametrize("path", [f"/dev/shm/sandbox-probe-{uuid.uuid4().hex}", "/proc/sys/kernel/hostname"],
                         ids=["/dev/shm", "/proc/sys"])
def test_dev_and_proc_are_read_only(path):
    # the hostname is written with its own value, so that even a failure changes nothing
    statement = f"open({path!r}, 'w').write(open({path!r}).read() if os.path.exists({path!r}) else 'x')"
    try:
        assert run_python(python_call(statement)).result == "failed: errno 30"
    finally:
        if path.startswith("/dev/shm/"):
            Path(path).unlink(missing_ok=True)


CHANGES = {
    "truncate by open(w)": python_call("open(VICTIM, 'w')"),
    "truncate": libc_call("libc.truncate(VICTIM.encode(), 0)"),
    "open O_TRUNC": libc_call("libc.open(VICTIM.encode(), os.O_WRONLY | os.O_TRUNC)"),
    "unlink": libc_call("libc.unlink(VICTIM.encode())"),
    "rename": libc_call("libc.rename(VICTIM.encode(), VICTIM.encode() + b'.moved')"),
    "chmod": libc_call("libc.chmod(VICTIM.encode(), 0o777)"),
    "rmdir": libc_call("libc.rmdir(os.path.dirname(VICTIM).encode())"),
    "symlink": libc_call("libc.symlink(b'/etc/passwd', VICTIM.encode() + b'.link')"),
}


@contained
@pytest.mark.parametrize("change", CHANGES)
def test_files_outside_cannot_be_changed(outside, change):
    victim = outside / "victim.txt"
    seen = f"VICTIM = {str(victim)!r}\nassert open(VICTIM).read() == 'precious', 'the sandbox cannot see it'\n"
    assert run_python(seen + CHANGES[change]).result == "failed: errno 30"
    assert victim.read_text() == "precious" and victim.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in outside.iterdir()] == ["victim.txt"]


@contained
def test_filling_the_disk_stops_at_the_private_tmp():
    fill = ("import errno, sys\nwritten = 0\ntry:\n    for i in range(100):\n"
            "        with open(f'part{i}', 'wb') as f:\n            f.write(bytes(8 * 2**20))\n        written += 8\n"
            "except OSError as e:\n    sys.exit(f'{errno.errorcode[e.errno]} after {written} MiB')\n")
    outcome = run_python(fill)
    assert outcome.result.startswith("failed: ENOSPC after ")
    assert int(outcome.result.split()[-2]) <= TMP_BYTES // 2**20
    big = python_call("open('big', 'wb').write(bytes(32 * 2**20))")          # one file past the 16 MiB limit
    assert run_python(big).result == "failed: errno 27"


def inet(host: str, port: int) -> bytes:
    """struct sockaddr_in of host:port."""
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)


def connect(family: int, address: bytes) -> str:
    """A program connecting a libc stream socket of family to the packed address, around the guard."""
    return LIBC + (f"fd = libc.socket({family}, 1, 0)\n"
                   "if fd < 0:\n    sys.exit(f'errno {ctypes.get_errno()}')\n"
                   f"address = {address!r}\n"
                   "connected = libc.connect(fd, address, len(address)) == 0\n"
                   "sys.exit('done' if connected else f'errno {ctypes.get_errno()}')\n")


def arrived(server: socket.socket) -> bool:
    """Whether a connection waits in the listening server's queue (a connect that succeeded puts it there)."""
    server.setblocking(False)
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@contained
def test_a_server_on_our_loopback_is_out_of_reach():
    """The program's loopback is its own network namespace's: nothing listens there."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        outcome = run_python(connect(socket.AF_INET, inet("127.0.0.1", server.getsockname()[1])))
        assert outcome.result == "failed: errno 111" and not arrived(server)            # ECONNREFUSED


@contained
def test_a_unix_socket_of_ours_is_out_of_reach(outside):
    """A daemon's socket file is a door out of every namespace: the seccomp filter refuses AF_UNIX."""
    path = outside / "daemon.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        address = struct.pack("=H", socket.AF_UNIX) + bytes(path) + b"\0"
        assert run_python(connect(socket.AF_UNIX, address)).result == "failed: errno 1" and not arrived(server)


@contained
def test_no_route_beyond_and_no_raw_sockets():
    # TEST-NET-1 (192.0.2.0/24) is routed nowhere; in an empty namespace there is no route at all
    assert run_python(connect(socket.AF_INET, inet("192.0.2.1", 80))).result == "failed: errno 101"   # ENETUNREACH
    for family, protocol in ((socket.AF_INET, socket.IPPROTO_ICMP), (socket.AF_PACKET, 0)):
        raw = libc_call(f"libc.socket({family}, {socket.SOCK_RAW}, {protocol})")
        assert run_python(raw).result == "failed: errno 1"


# A process that runs run_python and prints the outcome: the signal tests evaluate there, so that a
# SIGSTOP that got through would freeze it (and fail the test at its timeout), never pytest.
EVALUATOR = """\
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
print(sandbox.run_python(sys.stdin.read().replace("EVALUATOR", str(os.getpid()))).result)
"""


def state(pid: int) -> str:
    """The process's state letter (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contained
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
@pytest.mark.parametrize("target", ["evaluator", "unrelated", "parent", "every"])
def test_signals_reach_no_process_outside(target, signal_number):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid = {"evaluator": "EVALUATOR", "unrelated": str(bystander.pid), "parent": "os.getppid()",
               "every": "-1"}[target]
        source = LIBC + f"libc.kill({pid}, {int(signal_number)})\ntime.sleep(0.2)\n"
        evaluation = subprocess.run([sys.executable, "-c", EVALUATOR, sandbox.__file__], input=source,
                                    capture_output=True, text=True, timeout=30)
        assert (evaluation.returncode, evaluation.stdout) == (0, "passed\n"), evaluation.stderr
        assert bystander.poll() is None and state(bystander.pid) != "T"
    finally:
        bystander.kill()
        bystander.wait()


@contained
@pytest.mark.parametrize("double", [False, True], ids=["fork", "double-fork-setsid"])
def test_nothing_outlives_the_deadline(outside, double):
    """The program forks (and the child setsid()s and forks again) a process that would write a file
    after the deadline, then loops: past the deadline no process of it is left, and no file comes."""
    marker, late = f"sbx{uuid.uuid4().hex[:8]}", outside / "late.txt"
    escape = "    libc.setsid()\n    if libc.fork() != 0:\n        os._exit(0)\n" if double else ""
    source = (LIBC + name_it(marker) + "if libc.fork() == 0:\n" + escape +
              f"    time.sleep(1.5)\n    open({str(late)!r}, 'w').write('late')\n    os._exit(0)\n"
              "while True:\n    pass\n")
    assert run_python(source, timeout_s=1.0).result == "timed out"
    assert named(marker) == []
    time.sleep(1.0)
    assert named(marker, within_s=0) == [] and not late.exists()


@contained
def test_the_sandbox_dies_with_the_evaluating_process():
    marker = f"sbx{uuid.uuid4().hex[:8]}"
    evaluator = subprocess.Popen([sys.executable, "-c", EVALUATOR, sandbox.__file__], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, text=True)
    evaluator.stdin.write(LIBC + name_it(marker) + "while True:\n    pass\n")
    evaluator.stdin.close()
    started = time.monotonic()
    while not named(marker, within_s=0) and time.monotonic() - started < 8:
        time.sleep(0.05)
    assert named(marker, within_s=0), "the program never started"
    evaluator.kill()
    evaluator.wait()
    assert named(marker) == []


@contained
def test_a_fork_bomb_is_refused():
    """Each fork is refused (EPERM, the seccomp filter; RLIMIT_NPROC spares root); were one not, the
    bomb would stop at 2**10 processes, and all of them at the deadline."""
    marker = f"sbx{uuid.uuid4().hex[:8]}"
    bomb = (LIBC + name_it(marker) + "errors = [ctypes.get_errno() for _ in range(10) if libc.fork() < 0]\n"
            "sys.exit(f'refused {len(errors)} of 10, errno {sorted(set(errors))}')\n")
    assert run_python(bomb, timeout_s=2.0).result == "failed: refused 10 of 10, errno [1]"
    assert named(marker) == []


@contained
def test_threads_still_work():
    threads = ("import threading\ndone = []\n"
               "threads = [threading.Thread(target=done.append, args=(i,)) for i in range(8)]\n"
               "for t in threads:\n    t.start()\nfor t in threads:\n    t.join()\n"
               "assert sorted(done) == list(range(8))\n")
    assert run_python(threads).passed


def test_an_interpreter_under_tmp_stays_visible(monkeypatch):
    """A virtualenv made under /tmp (CI's may be) is bound back read-only over the private /tmp,
    else bwrap cannot start its python; nothing else under /tmp is."""
    for name in ("prefix", "exec_prefix"):
        monkeypatch.setattr(sys, name, "/tmp/venv-x")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "executable", "/tmp/venv-x/bin/python")
    command = sandbox._bwrap_command("bwrap", 3)
    tmpfs = command.index("--tmpfs")
    assert command[tmpfs + 1:tmpfs + 5] == ["/tmp", "--ro-bind", "/tmp/venv-x", "/tmp/venv-x"]
    assert [path for path in command if path.startswith("/tmp/")] == ["/tmp/venv-x"] * 2 + ["/tmp/venv-x/bin/python"]
