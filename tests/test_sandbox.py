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
    open_net = run_tests(code, "", audit_hook=False, network_namespace=False, landlock=False)
    if not open_net.passed:
        pytest.skip("loopback unreachable even without the sandbox")
    srv.accept()[0].close()
    r = run_tests(code, "", audit_hook=False, landlock=False)
    if r.passed:
        pytest.skip("this kernel refuses network namespaces; only the audit hook blocks the network here")
    assert "unreachable" in r.stderr or "OSError" in r.stderr
    assert _no_connection(srv)


def test_process_group_killed_on_timeout():
    """With the audit hook and Landlock off, a child process escapes them but not the group kill."""
    code = ("import subprocess, sys\np = subprocess.Popen(['sleep', '60'])\n"
            "print(p.pid, flush=True)\nwhile True:\n    pass\n")
    r = run_tests(code, "", audit_hook=False, landlock=False, timeout=2)
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


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "raise SystemExit\n", "import os\nos._exit(0)\n",
                                  "import sys\nsys.stdout.flush()\nimport os\nos.kill(os.getpid(), 9)\n",
                                  "print('passed')\nexit()\n"])
def test_exiting_before_the_tests_is_not_a_pass(code):
    """A solution that ends the process with status 0 before its tests ran gets no pass (reward hacking
    an RL policy can find), whatever it prints."""
    r = run_tests(code, "assert 1 == 2")
    assert not r.passed and r.status != "passed", (code, r)


def test_the_tests_are_not_readable_and_not_swallowed():
    r = run_tests("import os\nprint(sorted(os.listdir('.')))\n", "assert True")
    assert r.passed and "tests.py" not in r.stdout and "harness" not in r.stdout, r.stdout
    # an open triple-quoted string at the end of the solution cannot turn the tests into a string
    r = run_tests("def f():\n    return 1\nx = '''\n", "assert f() == 2\n'''")
    assert not r.passed


def test_the_hook_cannot_be_switched_off(tmp_path):
    target = str(tmp_path / "escaped.txt")
    attacks = [
        # the old harness kept its rules as __main__ globals
        "import sys\nm = sys.modules['__main__']\nfor k in list(vars(m)):\n"
        "    v = getattr(m, k)\n    if isinstance(v, (set, dict)):\n        v.clear()\n"
        "m._root = '/'\n",
        # the check's helpers, patched where the hook would look them up
        "import os, os.path, builtins\nos.path.realpath = lambda p: os.getcwd() + '/x'\n"
        "os.path.abspath = os.path.realpath\nos.lstat = lambda p: os.stat('.')\nbuiltins.isinstance = lambda *a: True\n"
        "builtins.any = lambda *a: False\n",
    ]
    for prep in attacks:
        for act in [f"open({target!r}, 'w').write('x')", "import os\nos.fork()\n", "import socket\n"]:
            r = run_tests(prep + act, "")
            assert not r.passed and "PermissionError" in r.stderr, (prep, act, r.stderr[-300:])
    assert not os.path.exists(target)


def test_paths_that_change_or_hide_their_target(tmp_path):
    target = str(tmp_path / "escaped.txt")
    # a PathLike that would show the hook an inside path and open() the outside one (open converts once)
    run_tests("class P:\n    n = 0\n    def __fspath__(self):\n        P.n += 1\n"
              f"        return 'inside.txt' if P.n == 1 else {target!r}\nopen(P(), 'w').write('x')\n", "")
    assert not os.path.exists(target)
    for code in [
        f"import pathlib\npathlib.Path({target!r}).write_text('x')\n",
        f"class S(str):\n    def startswith(self, *a):\n        return True\nopen(S({target!r}), 'w').write('x')\n",
        # a directory descriptor as the base of a relative path
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
        "import os\nfd = os.open('.', os.O_RDONLY)\nos.mkdir('a')\nos.chdir('a')\n"
        "os.open('../../escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
    ]:
        r = run_tests(code, "")
        assert not r.passed and "PermissionError" in r.stderr, (code, r.stderr[-300:])
    assert not os.path.exists(target)


def test_ordinary_code_still_runs():
    code = ("import collections, typing, enum, dataclasses, json, re, math, pathlib, gc\n"
            "P = collections.namedtuple('P', 'x y')\nT = typing.TypeVar('T')\n"
            "class C(enum.Enum):\n    A = 1\n@dataclasses.dataclass\nclass D:\n    v: int\n"
            "gc.collect()\npathlib.Path('out.txt').parent\nopen('out.txt', 'w').write(json.dumps([1]))\n"
            "def solve(n):\n    return P(n, D(n).v).x * 2\n")
    r = run_tests(code, "assert solve(3) == 6\nassert open('out.txt').read() == '[1]'\nprint('ok')")
    assert r.passed and "ok" in r.stdout, r.stderr[-500:]


def test_endless_output_is_capped():
    t = time.perf_counter()
    r = run_tests("while True:\n    print('x' * 1000)\n", "", timeout=2, max_output=5000)
    assert r.status == "timeout" and len(r.stdout) <= 5000
    assert time.perf_counter() - t < 8


# ---- found by an audit (2026-11-29) -------------------------------------------------------------------
@pytest.mark.parametrize("code", [
    "import builtins\nbuiltins.exec = lambda *a, **k: None",  # the harness's exec of the tests: a no-op
    "import builtins\nbuiltins.AssertionError = type('E', (BaseException,), {})",
    "__builtins__['len'] = lambda x: 0",
])
def test_the_solution_cannot_switch_off_the_tests(code):
    """A solution that set builtins.exec to a no-op passed tests that never ran."""
    assert run_tests(code + "\ndef f(x):\n    return x", "assert len([1]) == 1\nassert f(1) == 2").status == "failed"
    assert run_tests(code + "\ndef f(x):\n    return x", "assert len([1]) == 1\nassert f(1) == 1").passed


@pytest.mark.parametrize("code, made", [
    ("import sqlite3\nsqlite3.connect({p!r}).execute('create table t(x)')", "db"),
    ("import os\nos.mkfifo({p!r})", "fifo"),
    ("import posix\nposix.mknod({p!r})", "node"),
    ("import os\nos.setxattr({p!r}, 'user.x', b'1')", None),
])
def test_writes_without_an_audit_event(tmp_path, code, made):
    """sqlite3, mkfifo, mknod and setxattr wrote outside the directory: they raise no 'open' event."""
    target = tmp_path / (made or "f")
    if made is None:
        target.write_text("x")
    r = run_tests(code.format(p=str(target)), "pass")
    assert not r.passed, r.stderr
    assert made is None or not target.exists()


def test_no_signal_to_the_trainer_through_a_pidfd():
    """pidfd_open + pidfd_send_signal raise no audit event; they reached the trainer (SIGKILL too)."""
    code = "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGUSR1)"
    import signal
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    try:
        r = run_tests(code, "pass")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not r.passed and got == []


# ---- reward hacks by return value (2026-11-30) ----------------------------------------------------------
ANY = "class Any:\n    def __eq__(self, o):\n        return True\n    __ne__ = lambda s, o: False\n    __hash__ = None\n"


@pytest.mark.parametrize("code, tests", [
    (ANY + "def f(x):\n    return Any()", "assert f(2) == 4"),
    (ANY + "import functools\n@functools.lru_cache\ndef f(x):\n    return Any()", "assert f(2) == 4"),
    (ANY + "f = lambda x: Any()", "assert f(2) == 4"),
    (ANY + "class Solution:\n    def f(self, x):\n        return Any()", "assert Solution().f(2) == 4"),
    (ANY + "class Solution:\n    @staticmethod\n    def f(x):\n        return Any()", "assert Solution.f(2) == 4"),
    ("class L(list):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return L()", "assert f(2) == [4]"),
    ("class I(int):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return I(0)", "assert f(2) == 4"),
    ("class F:\n    def __bool__(self):\n        return False\ndef is_even(x):\n    return F()", "assert not is_even(4)"),
    ("class S:\n    def __sub__(self, o):\n        return 0\ndef root(x):\n    return S()", "assert abs(root(4) - 2) < 1e-9"),
    (ANY + "def f(x):\n    return [Any()]", "assert f(2) == [4]"),
    (ANY + "def f(x):\n    return Any()",  # the guard's error is no TypeError for the tests to expect
     "try:\n    f('x')\n    assert False\nexcept TypeError:\n    pass"),
])
def test_a_solution_cannot_pass_with_an_object_that_equals_anything(code, tests):
    """An object whose __eq__ is always True (or __bool__, __sub__ ...) passed every assert, a reward a
    policy can learn; the solution's functions and methods must return plain data now."""
    r = run_tests(code, tests)
    assert not r.passed, (r.status, r.stderr[-300:])
    if "try" not in tests:  # the hack itself works: the guard is what stops it
        assert run_tests(code, tests, plain_returns=False).passed


def test_plain_returns_keep_honest_solutions_working():
    """Builtin subclasses come back as their plain values (a Counter as a dict), recursion through the
    module or through self works at depth 900, classes of the solution work as instances the tests make,
    exceptions pass through, and the solution's globals are there."""
    code = ("import collections, functools\nLIMIT = 3\n"
            "def count(s):\n    return collections.Counter(s)\n"
            "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
            "@functools.lru_cache(None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
            "class Stack:\n    def __init__(self):\n        self.items = []\n"
            "    def push(self, x):\n        self.items.append(x)\n"
            "    def pop(self):\n        return self.items.pop()\n"
            "    def down(self, n):\n        return 0 if n == 0 else 1 + self.down(n - 1)\n"
            "def checked(x):\n    if x < 0:\n        raise ValueError('negative')\n    return (x, [x], {x: {x}})\n")
    tests = ("assert count('aab') == {'a': 2, 'b': 1}\nassert depth(900) == 900\nassert fib(80) == 23416728348467685\n"
             "s = Stack()\ns.push(5)\nassert s.pop() == 5\nassert s.down(900) == 900\nassert isinstance(s, Stack)\n"
             "assert checked(2) == (2, [2], {2: {2}})\nassert LIMIT == 3\n"
             "try:\n    checked(-1)\n    assert False\nexcept ValueError:\n    pass\nprint('ok')")
    r = run_tests(code, tests)
    assert r.passed and "ok" in r.stdout, r.stderr[-800:]
    # tests that compare objects of the solution's classes need plain_returns=False
    obj = "class P:\n    def __init__(self, v):\n        self.v = v\n    def __eq__(self, o):\n        return self.v == o.v\n" \
          "def make(v):\n    return P(v)\n"
    assert not run_tests(obj, "assert make(1) == P(1)").passed
    assert run_tests(obj, "assert make(1) == P(1)", plain_returns=False).passed


def test_the_guard_sees_through_borrowed_module_names():
    """A class of the solution's that claims another module (a metaclass property, a __module__ string) is
    still checked; a class really imported from a module is left as it is."""
    hacks = [ANY + "class M(type):\n    __module__ = property(lambda c: 'collections')\n"
             "class Solution(metaclass=M):\n    def f(self, x):\n        return Any()",
             ANY + "class Solution:\n    __module__ = 'collections'\n    def f(self, x):\n        return Any()"]
    for code in hacks:
        assert not run_tests(code, "assert Solution().f(2) == 4").passed
    imported = "from fractions import Fraction\ndef half(x):\n    return x / 2\n"
    assert run_tests(imported, "assert Fraction(1, 3).limit_denominator(10) == Fraction(1, 3)\n"
                               "assert half(3) == 1.5").passed


# ---- Landlock (2026-11-29, sixteenth session) -------------------------------------------------------------
def _landlock_abi():
    from reasonrl.rl.sandbox import _landlock_setup
    return _landlock_setup()["abi"]


needs_landlock = pytest.mark.skipif(not _landlock_abi(), reason="no Landlock on this kernel (or it is off)")


@needs_landlock
@pytest.mark.parametrize("audit_hook", [True, False])
def test_files_outside_the_directory_are_unreadable(tmp_path, audit_hook):
    """The trainer's files (here a 'secret' beside them), /etc and the project stay unreadable; the standard
    library still imports. With the audit hook off too: Landlock alone holds."""
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    for code in [f"print(open({str(secret)!r}).read())", "print(open('/etc/passwd').read())",
                 f"import os\nprint(os.listdir({str(tmp_path)!r}))", "import os\nprint(os.listdir('/'))",
                 f"print(open({os.path.abspath(__file__)!r}).read())"]:
        r = run_tests(code, "", audit_hook=audit_hook)
        assert not r.passed and "PermissionError" in r.stderr and "hunter2" not in r.stdout, (code, r.stderr[-300:])
        assert "secret.txt" not in r.stdout and "root" not in r.stdout
    # off: the same read goes through (the test above is not passing for another reason)
    r = run_tests(f"print(open({str(secret)!r}).read())", "", landlock=False)
    assert r.passed and "hunter2" in r.stdout
    r = run_tests("import json, fractions, decimal, heapq, itertools, statistics, datetime, random, typing\n"
                  "open('mine.txt', 'w').write('x')\nprint(open('mine.txt').read())", "", audit_hook=audit_hook)
    assert r.passed and "x" in r.stdout, r.stderr[-300:]


@needs_landlock
def test_landlock_alone_blocks_writes_network_and_signals(tmp_path, server):
    """Audit hook and network namespace off: Landlock still refuses a write outside, a TCP connection
    (ABI >= 4) and a signal to the trainer (ABI >= 6)."""
    target = tmp_path / "escaped.txt"
    r = run_tests(f"open({str(target)!r}, 'w').write('x')", "", audit_hook=False, network_namespace=False)
    assert not r.passed and "PermissionError" in r.stderr and not target.exists()
    abi = _landlock_abi()
    srv, port = server
    if abi >= 4:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        r = run_tests(code, "", audit_hook=False, network_namespace=False)
        assert not r.passed and _no_connection(srv), r.stderr[-300:]
    if abi >= 6:
        import signal
        got = []
        old = signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        try:
            r = run_tests("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)", "", audit_hook=False)
            time.sleep(0.2)
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert not r.passed and "PermissionError" in r.stderr and got == []


# ---- a red team's findings (2026-11-29, sixteenth session) -----------------------------------------------
EQ = "class _Eq:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
SQ = "assert f(2) == 4\nassert f(3) == 9\n"
S_SQ = "s = Solution()\nassert s.square(2) == 4\nassert s.square(3) == 9\n"


@pytest.mark.parametrize("code, tests", [
    ("class f:\n    def __init__(self, *a):\n        pass\n    def __eq__(self, o):\n        return True\n", SQ),
    ("class M(type):\n    def __eq__(cls, o):\n        return True\n    __hash__ = type.__hash__\n"
     "class _A(metaclass=M):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return _A()\n", SQ),
    # (`type(v) in scalars` asked M.__eq__, which said _A was int)
    (EQ + "class Solution:\n    def __init__(self):\n        self.square = lambda x: _Eq()\n"
          "    def square(self, x):\n        return 0\n", S_SQ),  # the instance's attribute shadowed the check
    (EQ + "class Solution:\n    def __init__(self):\n        self.__dict__['square'] = lambda x: _Eq()\n"
          "    def square(self, x):\n        return 0\n", S_SQ),
    (EQ + "class Solution:\n    def __getattribute__(self, n):\n        return lambda *a: _Eq()\n"
          "    def square(self, x):\n        return 0\n", S_SQ),
    (EQ + "class Base:\n    def square(self, x):\n        return _Eq()\nclass Solution(Base):\n    pass\n", S_SQ),
    (EQ + "class M(type):\n    def __call__(cls, *a):\n        return _Eq()\nclass f(metaclass=M):\n    pass\n", SQ),
    (EQ + "import collections\nf = collections.defaultdict(_Eq).__getitem__\n", SQ),  # a bound C method
])
def test_the_guard_holds_against_a_red_team(code, tests):
    r = run_tests(code, tests)
    assert not r.passed, (code, r.status, r.stderr[-300:])


def test_the_solution_cannot_read_the_tests_through_an_audit_hook_of_its_own():
    """A hook of the solution's saw the tests' code object at their exec and returned the constants the
    asserts compare with (an answer lookup that passed)."""
    code = ("import sys\n_seen = []\nsys.addaudithook(lambda e, a: _seen.append(a[0]) if e == 'exec' else None)\n"
            "def f(x):\n    consts = [c for co in _seen for c in getattr(co, 'co_consts', ()) if type(c) is int]\n"
            "    return consts[consts.index(x) + 1] if x in consts else 0\n")
    r = run_tests(code, SQ)
    assert not r.passed and r.status == "failed", r.stderr[-300:]
    # refused by the sandbox's hook (CPython then drops the new hook without an error): it never sees an event
    r = run_tests("import sys\nseen = []\nsys.addaudithook(lambda e, a: seen.append(e))\nopen('x', 'w').close()\n"
                  "print(len(seen))", "")
    assert r.passed and r.stdout.strip() == "0", (r.stdout, r.stderr[-300:])


@pytest.mark.parametrize("audit_hook", [True, False])
def test_no_extension_module_under_another_name(audit_hook):
    """_posixsubprocess loaded from its file as 'ok._posixsubprocess' passed the import check (its first
    part only) and started a process with no audit hook at all; the hook now checks every part and the
    file, and with Landlock the file cannot even be read."""
    code = ("import importlib.util, importlib.machinery, os\n"
            "d = os.path.dirname(importlib.machinery.PathFinder.find_spec('_json').origin)\n"
            "p = [os.path.join(d, f) for f in os.listdir(d) if f.startswith('_posixsubprocess.')][0]\n"
            "spec = importlib.util.spec_from_file_location('ok._posixsubprocess', p,\n"
            "    loader=importlib.machinery.ExtensionFileLoader('ok._posixsubprocess', p))\n"
            "importlib.util.module_from_spec(spec)\nprint('loaded')\n")
    if not audit_hook and not _landlock_abi():
        pytest.skip("without the audit hook, only Landlock stops this")
    r = run_tests(code, "", audit_hook=audit_hook)
    assert not r.passed and "loaded" not in r.stdout and ("not allowed" in r.stderr or "Permission denied" in r.stderr), \
        r.stderr[-300:]


def test_metadata_outside_through_a_fresh_posix_or_a_dir_fd(tmp_path):
    """A fresh copy of the posix module brought back the deleted setxattr; chmod, chown and utime took a
    dir_fd the check did not see; an O_PATH open handed out a directory descriptor."""
    victim = tmp_path / "victim.txt"
    victim.write_text("v")
    os.chmod(victim, 0o600)
    v = str(victim)
    fresh = "import importlib.util\nP = importlib.util.module_from_spec(importlib.util.find_spec('posix'))\n"
    for code in [fresh + f"P.setxattr({v!r}, 'user.pwn', b'1')",
                 f"import os\nos.open({str(tmp_path)!r}, os.O_PATH)",
                 "import os\nfd = os.open('.', os.O_RDONLY | os.O_DIRECTORY)",
                 "import os\nos.mkdir('d')\nfd = os.open('d', os.O_RDONLY)\nos.chmod('x', 0o777, dir_fd=fd)",
                 f"import os\nfd = os.open({v!r}, os.O_RDONLY)\nos.chmod(fd, 0o777)"]:
        r = run_tests(code, "")
        assert not r.passed and "PermissionError" in r.stderr, (code, r.stderr[-300:])
    assert oct(victim.stat().st_mode & 0o777) == "0o600" and os.listxattr(victim) == []


def test_a_program_that_closes_its_streams_and_sleeps_ends_at_the_timeout():
    t = time.perf_counter()
    r = run_tests("import os, time\nos.closerange(0, 64)\ntime.sleep(30)\n", "", timeout=1.5)
    assert r.status == "timeout" and time.perf_counter() - t < 3.5, (r.status, time.perf_counter() - t)


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("code, tests", [
    ("def f(x):\n    return None\ndef all(it):\n    return True\n", "assert all(f(i) == i * i for i in range(5))"),
    ("def f(x):\n    return None\ndef sorted(x):\n    return [1, 2, 3]\n", "assert sorted(f(0)) == [1, 2, 3]"),
    ("def f(x):\n    return 0\nabs = lambda x: 0\n", "assert abs(f(2) - 4) < 1e-9"),
])
def test_the_tests_see_the_real_builtins(code, tests, plain):
    """A solution that defined all(), sorted() or abs() at its top level passed tests that call them (the
    tests ran in its namespace, where its names shadow the builtins)."""
    r = run_tests(code, tests, plain_returns=plain)
    assert not r.passed and r.status in ("failed", "error") and "harness" not in r.stderr.splitlines()[-1], \
        (r.status, r.stderr[-300:])


def test_the_solution_keeps_its_own_helpers_named_like_builtins():
    r = run_tests("def max(a, b):\n    return a if a > b else b\ndef best(xs):\n    m = xs[0]\n"
                  "    for x in xs:\n        m = max(m, x)\n    return m\n",
                  "assert best([3, 9, 2]) == 9\nassert max([1, 5]) == 5")  # the tests' max is the builtin
    assert r.passed, r.stderr[-300:]


def test_a_stdlib_module_name_is_that_module_in_the_tests():
    code = ("class math:\n    @staticmethod\n    def isclose(*a, **k):\n        return True\n"
            "def f(x):\n    return 0.0\n")
    r = run_tests(code, "assert math.isclose(f(2), 4.0)")
    assert not r.passed, r.stderr[-300:]
    # the solution's own import of the real module stays visible to tests that rely on it
    r = run_tests("import math\ndef f(x):\n    return math.sqrt(x)\n", "assert math.isclose(f(16.0), 4.0)")
    assert r.passed, r.stderr[-300:]


@pytest.mark.parametrize("code, tests", [
    ("import fractions\nfractions.Fraction.__eq__ = lambda s, o: True\ndef f(x):\n    return 5\n",
     "from fractions import Fraction\nassert f(1) == Fraction(1, 2)"),
    ("import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0.0\n",
     "import math\nassert math.isclose(f(2), 4.0)"),
    ("import collections\ncollections.Counter.__eq__ = lambda s, o: True\ndef f(x):\n    return {}\n",
     "from collections import Counter\nassert Counter('aab') == f(0)"),
])
def test_the_standard_library_is_put_back_before_the_tests(code, tests):
    """A solution patched a stdlib class or function the tests then use (Fraction.__eq__, math.isclose)."""
    r = run_tests(code, tests)
    assert not r.passed and r.status == "failed", (r.status, r.stderr[-300:])


def test_the_standard_library_is_put_back_after_each_call_too():
    code = ("def f(x):\n    import fractions\n    fractions.Fraction.__eq__ = lambda s, o: True\n    return 5\n")
    r = run_tests(code, "from fractions import Fraction\nassert f(1) == Fraction(1, 2)")
    assert not r.passed and r.status == "failed", (r.status, r.stderr[-300:])


# ---- a second red team (2026-11-29, sixteenth session) ---------------------------------------------------
@pytest.mark.parametrize("audit_hook", [True, False])
def test_no_extension_module_from_another_python(audit_hook):
    """The system Python's dist-packages (readable under /usr/lib) had _cffi_backend: calls into C, which
    made int patchable (every test passed) and forked a process that outlived the timeout."""
    import glob
    found = glob.glob("/usr/lib/python3*/dist-packages/_cffi_backend*.so") + glob.glob("/usr/lib/python3*/lib-dynload/_ctypes*.so")
    if not found:
        pytest.skip("no other Python's extension modules on this machine")
    if not audit_hook and not _landlock_abi():
        pytest.skip("without the audit hook, only Landlock stops this")
    d, name = os.path.dirname(found[0]), os.path.basename(found[0]).split(".")[0]
    r = run_tests(f"import sys\nsys.path.insert(0, {d!r})\nimport {name}\nprint('loaded')\n", "", audit_hook=audit_hook)
    assert not r.passed and "loaded" not in r.stdout, r.stderr[-300:]


def test_the_tests_builtins_are_their_own():
    """The tests' builtins were the dict left in the solution's namespace: a function of it, when called,
    replaced sorted there."""
    code = "def f(x):\n    globals()['__builtins__']['sorted'] = lambda *a, **k: [1, 2, 3]\n    return x\n"
    r = run_tests(code, "assert sorted(f([3, 1, 2])) == [1, 2, 3]\nassert sorted(f([9, 9])) == [1, 2, 3]")
    assert not r.passed and r.status == "failed", (r.status, r.stderr[-300:])


@pytest.mark.parametrize("code, tests", [
    ("import sys, threading, fractions\nsys.setswitchinterval(1e-6)\ndef loop():\n    while True:\n"
     "        fractions.Fraction.__eq__ = lambda a, b: True\nthreading.Thread(target=loop, daemon=True).start()\n"
     "def f(x):\n    return 0\n", "from fractions import Fraction\nassert f(1) == Fraction(1, 2)"),
    ("import gc, math\ndef cb(*a):\n    math.isclose = lambda *a, **k: True\ngc.callbacks.append(cb)\n"
     "gc.set_threshold(1)\ndef f(x):\n    return 0.0\n",
     "import math\nassert math.isclose(f(2), 4.0)\nassert math.isclose(f(3), 9.0)"),
])
def test_nothing_of_the_solution_runs_beside_the_tests(code, tests):
    """A thread or a gc callback that patched the standard library in a loop beat the restore and passed."""
    r = run_tests(code, tests)
    assert not r.passed, (r.status, r.stderr[-300:])


def test_threads_that_are_joined_still_work():
    code = ("from concurrent.futures import ThreadPoolExecutor\ndef f(xs):\n    with ThreadPoolExecutor(2) as ex:\n"
            "        return list(ex.map(lambda x: x * x, xs))\n")
    r = run_tests(code, "assert f([1, 2, 3]) == [1, 4, 9]")
    assert r.passed, r.stderr[-300:]


@pytest.mark.parametrize("code", [
    EQ + "class Solution:\n    @property\n    def square(self):\n        return lambda x: _Eq()\n",
    EQ + "class C:\n    def __call__(self, *a):\n        return _Eq()\nclass Solution:\n    square = C()\n",
    EQ + "import functools\ndef g(_, x):\n    return _Eq()\nclass Solution:\n    square = staticmethod(functools.partial(g, 0))\n",
    EQ + "class Solution:\n    def __getattr__(self, n):\n        return lambda *a: _Eq()\n",
    EQ + "class Solution:\n    def __init__(self):\n        object.__setattr__(self, 'square', lambda x: _Eq())\n",
    EQ + "class Other:\n    def square(self, x):\n        return _Eq()\nclass Solution:\n    def __new__(cls):\n        return Other()\n",
    EQ + "class Other:\n    def square(self, x):\n        return _Eq()\nclass Solution:\n    def __init__(self):\n        self.__class__ = Other\n",
    EQ + "class Base:\n    def __init_subclass__(cls, **k):\n        type.__setattr__(cls, '__getattribute__', object.__getattribute__)\n"
         "        type.__setattr__(cls, 'square', lambda self, x: _Eq())\nclass Solution(Base):\n    pass\n",
    EQ + "import builtins\nbuiltins.any = lambda it: False\nclass Other:\n    def square(self, x):\n        return _Eq()\n"
         "class Solution:\n    def __init__(self):\n        self.__class__ = Other\n",
])
def test_the_guard_holds_against_a_second_red_team(code):
    r = run_tests(code, S_SQ)
    assert not r.passed, (r.status, r.stderr[-300:])


def test_solution_classes_still_work_through_the_guard():
    code = ("class Solution:\n    LIMIT = 5\n    def __init__(self):\n        self.memo = {}\n        self.calls = 0\n"
            "    @property\n    def size(self):\n        return len(self.memo)\n"
            "    def fib(self, n):\n        self.calls += 1\n        if n < 2:\n            return n\n"
            "        if n not in self.memo:\n            self.memo[n] = self.fib(n - 1) + self.fib(n - 2)\n"
            "        return self.memo[n]\n    @staticmethod\n    def sq(x):\n        return x * x\n"
            "    @classmethod\n    def limit(cls):\n        return cls.LIMIT * 2\n")
    tests = ("s = Solution()\nassert s.fib(60) == 1548008755920\nassert s.size == 59 and s.calls > 0\n"
             "assert Solution.sq(4) == 16 and Solution.LIMIT == 5 and Solution.limit() == 10\nt = Solution()\nassert t.fib(10) == 55\n"
             "assert isinstance(s, Solution)\nprint('ok')")
    r = run_tests(code, tests)
    assert r.passed and "ok" in r.stdout, r.stderr[-500:]


def test_exact_stdlib_values_come_back():
    """Fraction, Decimal, deque and dates were refused as not plain: correct solutions failed tests such as
    `assert f(1) == Fraction(1, 2)`. Exact types only (a subclass could say it equals anything)."""
    code = ("from fractions import Fraction\nfrom decimal import Decimal\nfrom collections import deque\nimport datetime\n"
            "def half(x):\n    return Fraction(x, 2)\ndef dec():\n    return Decimal('1.10')\n"
            "def dq():\n    return deque([1, 2], maxlen=3)\ndef day():\n    return datetime.date(2026, 11, 29)\n")
    tests = ("from fractions import Fraction\nfrom decimal import Decimal\nfrom collections import deque\nimport datetime\n"
             "assert half(1) == Fraction(1, 2)\nassert dec() == Decimal('1.1')\nassert dq() == deque([1, 2])\n"
             "assert day() == datetime.date(2026, 11, 29)")
    r = run_tests(code, tests)
    assert r.passed, r.stderr[-300:]
    r = run_tests("from fractions import Fraction\nclass F(Fraction):\n    def __eq__(self, o):\n        return True\n"
                  "def half(x):\n    return F(0)\n", "from fractions import Fraction\nassert half(1) == Fraction(1, 2)")
    assert not r.passed
