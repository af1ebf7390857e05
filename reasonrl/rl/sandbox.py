"""Run model-written Python against unit tests in a sandboxed subprocess.

Model output is untrusted, so several independent layers stand between it and the machine:
1. a fresh interpreter (`python -I -S`: no site-packages, no user paths, no PYTHON* variables) in a
   temporary working directory that is removed afterwards;
2. resource limits set in the child before exec (resource.setrlimit): CPU seconds, address space
   (memory bombs raise MemoryError), file size, open files, and RLIMIT_NPROC (fork bombs; the
   kernel does not enforce it for root, hence layer 4);
3. a network namespace of its own when the kernel allows it (unshare(CLONE_NEWNET), plus
   CLONE_NEWUSER when not root): no interface but a downed loopback, so nothing is reachable;
4. an audit hook (PEP 578) installed before the untrusted code runs, which cannot be removed: it
   refuses process creation (os.fork, os.system, os.exec*, os.posix_spawn, subprocess), sockets,
   ctypes / native-library loading, and any write, rename, removal or mkdir outside the working
   directory;
5. a wall-clock timeout, after which the whole process group is killed (start_new_session=True,
   os.killpg), so children that slipped through die with it.
This is a filter for reward computation, not a security boundary for hostile humans: use a
container or VM when that is the threat.
"""
from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Runs inside the child before the untrusted code. Arguments: the working directory, audit hook on.
_HARNESS = textwrap.dedent(r'''
    import sys, os
    _root = os.path.realpath(sys.argv[1])
    _BLOCKED = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                "subprocess.Popen", "socket.__new__", "socket.connect", "socket.bind",
                "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
                "os.kill", "os.killpg", "signal.pthread_kill", "sys.setprofile"}
    _NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "pty", "multiprocessing",
                  "_multiprocessing", "resource"}
    _PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                    "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move",
                    "shutil.copyfile", "shutil.copytree", "os.chdir", "os.chroot"}
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _realpath, _fspath, _sep = os.path.realpath, os.fspath, os.sep

    def _inside(p):
        if isinstance(p, int):
            return True  # already-open descriptor, opened under this same hook
        p = _realpath(_fspath(p))
        return p == _root or p.startswith(_root + _sep)

    def _hook(event, args):
        if event in _BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in _NO_IMPORT:
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & _W
            if writing and not _inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in _PATH_EVENTS:
            for a in args[:2]:
                if isinstance(a, (str, bytes)) and not _inside(a):
                    raise PermissionError(f"sandbox: {event} on {a!r} outside the working directory")

    if sys.argv[2] == "1":
        sys.addaudithook(_hook)
    del _hook
    _src = open("solution.py").read() + "\n\n" + open("tests.py").read()
    exec(compile(_src, "solution.py", "exec"), {"__name__": "__main__"})
''')


@dataclass
class SandboxResult:
    passed: bool       # exit status 0 within the limits
    status: str        # "passed" | "failed" | "timeout" | "memory" | "error"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _limits(cpu_s: int, memory_mb: int, file_mb: int, netns: bool):
    def apply():
        os.umask(0o077)
        for res, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb << 20),
                         (resource.RLIMIT_FSIZE, file_mb << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_NPROC, 32), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (val, val))
        if netns:  # best effort: the audit hook still blocks sockets where namespaces are off
            flags = _CLONE_NEWNET | (0 if os.geteuid() == 0 else _CLONE_NEWUSER)
            ctypes.CDLL(None, use_errno=True).unshare(flags)
    return apply


def run_tests(code: str, tests: str, *, timeout: float = 5.0, memory_mb: int = 512, file_mb: int = 16,
              network_namespace: bool = True, audit_hook: bool = True,
              max_output: int = 10_000) -> SandboxResult:
    """Run `code` then `tests` (plain asserts) in a sandboxed interpreter; passed when exit status is 0.

    audit_hook=False exists only so that tests can check the other layers on their own."""
    if timeout <= 0:
        raise ValueError(f"run_tests: timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 32:
        raise ValueError(f"run_tests: memory_mb must be >= 32 (the interpreter needs it), got {memory_mb}")
    workdir = tempfile.mkdtemp(prefix="reasonrl-sandbox-")
    try:
        for name, text in (("solution.py", code), ("tests.py", tests), ("_harness.py", _HARNESS)):
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "_harness.py", workdir, "1" if audit_hook else "0"], cwd=workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_limits(int(timeout) + 1, memory_mb, file_mb, network_namespace))
        try:
            out, err = proc.communicate(timeout=timeout)
            status = None
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            status = "timeout"
        _kill_group(proc.pid)  # stragglers left in the group after a normal exit
        seconds = time.monotonic() - start
        out, err = out.decode(errors="replace")[:max_output], err.decode(errors="replace")[:max_output]
        rc = proc.returncode
        if status is None:
            if rc == 0:
                status = "passed"
            elif "MemoryError" in err:
                status = "memory"
            elif rc is not None and rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL):
                status = "timeout"
            else:
                status = "failed" if "AssertionError" in err else "error"
        return SandboxResult(status == "passed", status, rc, out, err, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
