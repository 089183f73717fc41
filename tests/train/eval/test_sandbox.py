"""train.eval.sandbox: untrusted code runs in its own limited process; whatever it does, we get an outcome."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from train.eval.sandbox import network_isolated, run_python


def test_exit_status_decides():
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]").passed
    outcome = run_python("assert 1 + 1 == 3, 'wrong sum'")
    assert not outcome.passed and outcome.result == "failed: AssertionError: wrong sum"


def test_an_infinite_loop_is_killed_at_the_deadline():
    start = time.perf_counter()
    outcome = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert outcome.result == "timed out" and time.perf_counter() - start < 5


def test_a_crash_and_a_runaway_allocation_are_failures():
    assert run_python("import os\nos.abort()").result == "failed: exit status -6"
    assert run_python("import sys\nsys.setrecursionlimit(10**6)\ndef f(n): return f(n + 1)\nf(0)").passed is False
    assert run_python("x = bytearray(8 * 2**30)", memory_mb=512).result == "failed: MemoryError"


def test_a_flood_of_output_is_bounded():
    outcome = run_python("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n", timeout_s=5.0)
    assert not outcome.passed and len(outcome.result) < 300


def test_processes_and_sockets_are_refused_in_python():
    for source in ("import socket\nsocket.create_connection(('127.0.0.1', 80))",
                   "import subprocess\nsubprocess.run(['true'])", "import os\nos.fork()", "import os\nos.remove('x')"):
        assert run_python(source).result == "failed: PermissionError: disabled in the sandbox", source


@pytest.mark.skipif(not network_isolated(), reason="this kernel refuses unprivileged network namespaces")
def test_a_raw_socket_reaches_nothing():
    """Around the Python guard (libc through ctypes), a connection to a server listening on our
    loopback must not arrive: the program has its own empty network namespace."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(3)
    port = server.getsockname()[1]
    arrived = []
    waiter = threading.Thread(target=lambda: arrived.append(_accept(server)))
    waiter.start()
    source = (
        "import ctypes, struct, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "sys.exit(0 if fd >= 0 and libc.connect(fd, addr, len(addr)) == 0 else 3)\n")
    outcome = run_python(source)
    waiter.join()
    server.close()
    assert outcome.result == "failed: exit status 3" and arrived == [False]


def _accept(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except OSError:
        return False
