"""The code sandbox against hostile programs: infinite loop, fork bomb, memory bomb, writes outside
its directory, network attempts (each layer on its own where it can be switched off), leftovers."""
import os
import socket
import time
import uuid

import pytest

from reasonrl.rl.sandbox import run_tests


def test_pass_and_fail():
    ok = run_tests("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\nprint('done')")
    assert ok.passed and ok.status == "passed" and "done" in ok.stdout
    bad = run_tests("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5")
    assert not bad.passed and bad.status == "failed"
    err = run_tests("def add(a, b) return", "assert add(2, 3) == 5")
    assert not err.passed and err.status == "error" and "SyntaxError" in err.stderr


def test_infinite_loop_times_out():
    t = time.perf_counter()
    r = run_tests("while True:\n    pass\n", "", timeout=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t < 10


def test_fork_bomb_is_stopped():
    t = time.perf_counter()
    r = run_tests("import os\nwhile True:\n    os.fork()\n", "", timeout=3)
    assert not r.passed and "os.fork" in r.stderr
    assert time.perf_counter() - t < 10
    r = run_tests("import subprocess\nsubprocess.Popen(['sleep', '30'])\n", "", timeout=3)
    assert not r.passed
    r = run_tests("import os\nos.system('echo pwned')\n", "", timeout=3)
    assert not r.passed and "pwned" not in r.stdout


@pytest.mark.parametrize("code", ["x = bytearray(10**10)\n",
                                  "xs = []\nwhile True:\n    xs.append(bytearray(10**7))\n"])
def test_memory_bomb(code):
    r = run_tests(code, "", memory_mb=256, timeout=10)
    assert r.status == "memory" and not r.passed


def test_writes_outside_the_directory(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    target = f"/tmp/reasonrl-escape-{uuid.uuid4().hex}"
    for code in [f"open({target!r}, 'w').write('x')",
                 f"import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\n",
                 f"import os\nos.remove({str(victim)!r})",
                 f"import os\nos.rename({str(victim)!r}, 'mine.txt')",
                 f"open({str(victim)!r}, 'a').write('more')",
                 f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"]:
        r = run_tests(code, "")
        assert not r.passed and "PermissionError" in r.stderr, code
    assert not os.path.exists(target)
    assert victim.read_text() == "keep"
    # its own directory stays writable
    assert run_tests("open('scratch.txt', 'w').write('ok')", "assert open('scratch.txt').read() == 'ok'").passed


@pytest.fixture
def server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    yield srv, srv.getsockname()[1]
    srv.close()


def _no_connection(srv):
    try:
        srv.accept()
        return False
    except (socket.timeout, BlockingIOError):
        return True


def test_network_is_blocked(server):
    srv, port = server
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    r = run_tests(code, "")
    assert not r.passed and _no_connection(srv)
    r = run_tests("import _socket\n", "")
    assert not r.passed


def test_network_namespace_layer_alone(server):
    """With the audit hook off, the network namespace must still block the connection."""
    srv, port = server
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    open_net = run_tests(code, "", audit_hook=False, network_namespace=False)
    if not open_net.passed:
        pytest.skip("loopback unreachable even without the sandbox")
    srv.accept()[0].close()
    r = run_tests(code, "", audit_hook=False)
    if r.passed:
        pytest.skip("this kernel refuses network namespaces; only the audit hook blocks the network here")
    assert "unreachable" in r.stderr or "OSError" in r.stderr
    assert _no_connection(srv)


def test_process_group_killed_on_timeout():
    """With the audit hook off, a child process escapes the hook but not the group kill."""
    code = ("import subprocess, sys\np = subprocess.Popen(['sleep', '60'])\n"
            "print(p.pid, flush=True)\nwhile True:\n    pass\n")
    r = run_tests(code, "", audit_hook=False, timeout=2)
    assert r.status == "timeout"
    pid = int(r.stdout.split()[0])
    time.sleep(0.2)
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
        assert "Z" in state, f"child {pid} still alive: {state}"  # a zombie awaiting its reaper is dead
    except FileNotFoundError:
        pass


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        run_tests("", "", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_tests("", "", memory_mb=1)
