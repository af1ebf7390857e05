"""Run model-written Python against unit tests in a sandboxed subprocess.

Model output is untrusted, so several independent layers stand between it and the machine:
1. a fresh interpreter (`python -I -S`: no site-packages, no user paths, no PYTHON* variables) in a
   temporary working directory that is removed afterwards;
2. resource limits set in the child before exec (resource.setrlimit): CPU seconds, address space
   (memory bombs raise MemoryError), file size, open files, and RLIMIT_NPROC (fork bombs; the
   kernel does not enforce it for root, hence layer 4);
3. a network namespace of its own when the kernel allows it (unshare(CLONE_NEWNET), plus
   CLONE_NEWUSER when not root): no interface but a downed loopback, so nothing is reachable;
   and, where the kernel has Landlock (Linux >= 5.13), a Landlock domain set before exec: the
   interpreter reads only its own files (the executable, the standard library, the system's shared
   libraries) and writes only in the working directory, so the trainer's files, checkpoints, keys and
   /etc stay unreadable; TCP bind/connect are refused (ABI >= 4), and signals to processes outside the
   sandbox (the trainer) are refused (ABI >= 6). It is checked once per process (an interpreter that
   cannot start under it turns it off, with a warning);
4. an audit hook (PEP 578) installed before the untrusted code runs, which cannot be removed and
   whose rules live in a closure the code cannot reach or patch: it refuses process creation
   (os.fork, os.system, os.exec*, os.posix_spawn, subprocess), sockets, ctypes / native-library
   loading, symlinks, opening directories, sqlite3, and any write, rename, removal or mkdir outside
   the working directory (paths only as plain str/bytes); calls that raise no audit event (mkfifo,
   mknod, setxattr, pidfd_open / pidfd_send_signal, which could signal the trainer) are deleted from
   their modules; the tests run with the harness's exec and the builtins as they were before the
   solution ran (a solution that made exec a no-op passed tests that never ran);
5. a wall-clock timeout, after which the whole process group is killed (start_new_session=True,
   os.killpg), so children that slipped through die with it; output past max_output is dropped as
   it arrives.
A pass is exit status 0 *and* a nonce the harness writes to a channel of its own after the tests
ran; the tests reach the child through a pipe, never its directory. So sys.exit(0) before the
tests, printing a verdict, or reading the tests' expected values earn nothing. The tests see the
solution's functions and methods through a guard that hands them plain copies of the results (see
GUARD_SOURCE): an object whose __eq__ is always True earns nothing either (plain_returns=False turns
the guard off, for tests that compare objects of the solution's own classes).
This is a filter for reward computation, not a security boundary for hostile humans: use a
container or VM when that is the threat.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass

_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

# Runs inside the child before the untrusted code. argv: the working directory, audit hook on ("1"),
# the descriptor of the pass channel. stdin: the nonce line, then the solution and the tests as JSON.
# Everything the hook uses is bound inside _install's closure (the builtins and os functions too), so
# nothing the untrusted code can reach through modules (sys.modules["__main__"], os.path, builtins)
# changes what it checks; gc's object lists and tracing, ways back to that closure, are refused. The
# pass line (a nonce the parent made) is written to its own descriptor only after the tests ran: a
# program that exits early (sys.exit(0), os._exit(0)), prints a verdict or kills itself has not passed,
# and the tests are never on disk for the solution to read. Limit: frames stay readable (namedtuple,
# typing and enum need sys._getframe), so code that walks up to the harness's frame could read the
# nonce: a deliberate attack on this harness, which a container stops, not this filter.
# _install(root, hook_on): the audit hook (layer 4), as source, shared with the reasoning-gym scoring worker
# (reasonrl/rl/rgscore.py).
HOOK_SOURCE = textwrap.dedent(r"""
    def _install(root, hook_on):
        blocked = frozenset({
            "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "ctypes.dlopen",
            "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg", "signal.pthread_kill", "sys.setprofile",
            "sys.settrace", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
            "os.symlink", "sys.monitoring.register_callback", "sqlite3.connect"})
        no_import = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "pty",
                               "multiprocessing", "_multiprocessing", "resource", "sqlite3", "_sqlite3"})
        # event -> positions of its path arguments (the rest: modes, ids, times, dir_fd)
        path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                       "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "os.chdir": (0,),
                       "os.chroot": (0,), "os.rename": (0, 1), "os.link": (0, 1), "shutil.move": (0, 1),
                       "shutil.copyfile": (0, 1), "shutil.copytree": (0, 1)}
        W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def inside(p, getcwd=os.getcwd, type=type, int=int, str=str, bytes=bytes):
            # Only exact int (an already-open descriptor, opened under this same hook), str or bytes: a
            # PathLike's __fspath__ or a str subclass could show the hook one path and the call another.
            # Lexical: no symlink can be made (os.symlink is refused), no directory opened (so no dir_fd
            # or fchdir moves the base of a relative path), and a hard link is checked at its source, so
            # the text of the path is where the write lands.
            t = type(p)
            if t is int:
                return True
            if t is bytes:
                p = bytes.decode(p, "utf-8", "surrogateescape")
            elif t is not str:
                return False
            if not str.startswith(p, "/"):
                p = getcwd() + "/" + p
            parts = []
            for part in str.split(p, "/"):
                if part == "..":
                    if parts:
                        parts.pop()
                elif part and part != ".":
                    parts.append(part)
            p = "/" + "/".join(parts)
            return p == root or str.startswith(p, root + "/")

        def is_dir(p, stat=os.stat, S_ISDIR=__import__("stat").S_ISDIR, type=type, str=str, bytes=bytes):
            try:  # no user code inside the hook: a PathLike's __fspath__ is not called
                return (type(p) is str or type(p) is bytes) and S_ISDIR(stat(p).st_mode)
            except Exception:
                return False

        def hook(event, args, PermissionError=PermissionError, any=any, str=str, type=type, repr=repr,
                 len=len):
            if event in blocked:
                raise PermissionError("sandbox: " + event + " is not allowed")
            if event == "import" and str.split(str(args[0]), ".")[0] in no_import:
                raise PermissionError("sandbox: import " + str(args[0]) + " is not allowed")
            if event == "open":
                path, mode, flags = args
                writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & W
                if is_dir(path):  # no directory descriptors: a dir_fd would move the base of a relative path
                    raise PermissionError("sandbox: opening a directory (" + repr(path) + ") is not allowed")
                if writing and not inside(path):
                    raise PermissionError("sandbox: writing " + repr(path) + " outside the working directory "
                                          "(or not a str path)")
            elif event in path_events:
                for i in path_events[event]:
                    if i < len(args) and not inside(args[i]):
                        raise PermissionError("sandbox: " + event + " on " + repr(args[i]) +
                                              " outside the working directory (or not a str path)")

        if hook_on:
            sys.addaudithook(hook)
            # Calls that raise no audit event: made unreachable instead (best effort; the modules'
            # attributes are the only references). mkfifo / mknod / setxattr wrote outside the
            # directory; pidfd_open + pidfd_send_signal could signal the trainer (SIGKILL included).
            import posix, signal
            for mod in (os, posix):
                for name in ("mkfifo", "mknod", "setxattr", "removexattr", "lsetxattr", "pidfd_open"):
                    if hasattr(mod, name):
                        delattr(mod, name)
            if hasattr(signal, "pidfd_send_signal"):
                del signal.pidfd_send_signal
""")

# _guarded(ns, sys): the namespace the tests run in (plain_returns). Every function the solution left in it
# and every method of its classes returns a plain copy of its result: exact numbers, strings, bytes, None,
# and lists / tuples / dicts / sets of them, rebuilt through the builtin types' own methods (a subclass's
# overrides are not called); anything else ends the run (a BaseException, so no except clause of the
# tests turns it into a pass). Otherwise a solution could return an object
# whose __eq__ is always True (or __bool__, __sub__, ...) and pass every assert. Calls the solution makes
# to itself go through unchecked (a counter), so recursion pays one frame, not a copy of its result.
# Defined, with the builtins it uses bound, before the solution runs: it cannot rebind them.
GUARD_SOURCE = textwrap.dedent(r"""
    def _make_guard(type=type, issubclass=issubclass, dict=dict, list=list, tuple=tuple, set=set,
                    frozenset=frozenset, int=int, float=float, str=str, bytes=bytes, complex=complex,
                    bool=bool, staticmethod=staticmethod, classmethod=classmethod,
                    vars=vars, callable=callable, isinstance=isinstance, FunctionType=type(lambda: 0),
                    ModuleType=type(sys), BuiltinType=type(len), Exception=Exception, modules=sys.modules,
                    module_of=type.__dict__["__module__"].__get__, name_of=type.__dict__["__name__"].__get__,
                    getattr=getattr):
        scalars = (bool, int, float, complex, str, bytes, type(None))
        depth = [0]

        class NotPlainData(BaseException):  # not an Exception, not a TypeError: a test that expects one to
            pass                            # be raised must not pass on this

        def plain(v, name, level=0):
            t = type(v)
            if t in scalars:
                return v
            if level > 64:
                raise NotPlainData(f"{name}() returned data nested more than 64 levels deep")
            if issubclass(t, int):
                return int.__int__(v)
            if issubclass(t, float):
                return float.__float__(v)
            if issubclass(t, str):
                return str.__str__(v)
            if issubclass(t, bytes):
                return bytes.__bytes__(v)
            if issubclass(t, complex):
                return complex.__complex__(v)
            if issubclass(t, list):
                return [plain(x, name, level + 1) for x in list.__iter__(v)]
            if issubclass(t, tuple):
                return tuple([plain(x, name, level + 1) for x in tuple.__iter__(v)])
            if issubclass(t, dict):
                return {plain(k, name, level + 1): plain(x, name, level + 1) for k, x in dict.items(v)}
            if issubclass(t, frozenset):
                return frozenset([plain(x, name, level + 1) for x in frozenset.__iter__(v)])
            if issubclass(t, set):
                return {plain(x, name, level + 1) for x in set.__iter__(v)}
            raise NotPlainData(f"{name}() returned a {t.__name__!r} object: the tests compare plain values (numbers, "
                            "strings, bytes, None, and lists, tuples, dicts and sets of them), and an object "
                            "of the solution's own making could claim to equal anything")

        def wrap(fn, name):
            def checked(*args, **kwargs):
                if depth[0]:  # the solution calling itself: unchecked
                    return fn(*args, **kwargs)
                depth[0] += 1
                try:
                    out = fn(*args, **kwargs)
                finally:
                    depth[0] -= 1
                return plain(out, name)
            return checked

        def guarded(ns):
            out = dict(ns)
            for key, v in ns.items():
                if key.startswith("_"):  # private helpers (and namedtuple's _make, _replace): the tests' API is public
                    continue
                if isinstance(v, type):
                    mod = module_of(v)  # read past any metaclass property
                    if type(mod) is str and mod != "__main__" and getattr(modules.get(mod), name_of(v), None) is v:
                        continue  # imported (from collections import Counter, ...): as it is
                    # a class of the solution's: the tests get a subclass whose methods are checked
                    methods = {}
                    for m, f in vars(v).items():
                        if m.startswith("_"):
                            continue
                        if type(f) is FunctionType:
                            methods[m] = wrap(f, f"{key}.{m}")
                        elif type(f) is staticmethod and type(f.__func__) is FunctionType:
                            methods[m] = staticmethod(wrap(f.__func__, f"{key}.{m}"))
                        elif type(f) is classmethod and type(f.__func__) is FunctionType:
                            methods[m] = classmethod(wrap(f.__func__, f"{key}.{m}"))
                    if methods:
                        try:
                            out[key] = type(v.__name__, (v,), {**methods, "__module__": "__main__",
                                                               "__qualname__": v.__qualname__})
                        except Exception:  # a class that cannot be subclassed (an Enum, a metaclass's doing): as it is
                            pass
                elif type(v) is not ModuleType and type(v) is not BuiltinType and callable(v):
                    out[key] = wrap(v, key)  # functions, lambdas, lru_cache wrappers, partials, callable objects
            return out
        return guarded
""")

_HARNESS = "import sys, os, json\n" + HOOK_SOURCE + GUARD_SOURCE + textwrap.dedent(r"""
    def _run():
        os.unlink(sys.argv[0])  # this file: nothing in the working directory tells how the verdict is made
        nonce = sys.stdin.readline().strip()
        job = json.loads(sys.stdin.read())
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        fd, write = int(sys.argv[3]), os.write
        code = (compile(job["code"], "solution.py", "exec"), compile(job["tests"], "tests.py", "exec"))
        guarded = _make_guard() if job.get("plain_returns", True) else None
        limit, set_limit = sys.getrecursionlimit, sys.setrecursionlimit  # bound before the solution runs
        _install(os.path.realpath(sys.argv[1]), sys.argv[2] == "1")
        # Taken before the solution runs, which can rebind names in the builtins module (a solution
        # that set builtins.exec to a no-op passed tests that never ran): the tests run with the
        # harness's exec and a copy of the builtins as they were.
        run, builtins_then = exec, dict(vars(__builtins__) if not isinstance(__builtins__, dict) else __builtins__)
        ns = {"__name__": "__main__", "__builtins__": dict(builtins_then)}
        run(code[0], ns)  # the solution, then the tests in its namespace (compiled apart: the solution's
        ns["__builtins__"] = builtins_then  # text cannot swallow the tests, e.g. with an open string)
        if guarded:  # a checked method that recurses through self pays a wrapper frame a level: room for it
            set_limit(max(limit(), 2100))
        run(code[1], guarded(ns) if guarded else ns)
        sys.stdout.flush()
        write(fd, (nonce + "\n").encode())

    try:
        _run()
    finally:
        del _run, _install, _make_guard
""")


@dataclass
class SandboxResult:
    passed: bool       # the tests ran to their end, exit status 0, within the limits
    status: str        # "passed" | "failed" | "timeout" | "memory" | "error"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


# ---- Landlock (layer 3b) ---------------------------------------------------------------------------------
# Syscall numbers are the same on every architecture (the generic table, Linux 5.13+).
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR, _LL_TRUNCATE, _LL_IOCTL_DEV = 1, 2, 4, 8, 1 << 14, 1 << 15
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV
_PR_SET_NO_NEW_PRIVS, _O_PATH = 38, getattr(os, "O_PATH", 0o10000000)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none (old kernel, disabled, not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        r = ctypes.CDLL(None, use_errno=True).syscall(_LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except (AttributeError, OSError):
        return 0
    return max(int(r), 0)


def _landlock_paths() -> tuple[list[str], list[str]]:
    """(read + execute roots, read-only files) that the interpreter needs to start and import its standard
    library: the executable's directory, the standard library, libpython's directory, the dynamic loader
    and the system's shared libraries. Nothing else outside the working directory is readable."""
    import sysconfig
    exe = os.path.realpath(sys.executable)
    roots = {os.path.dirname(exe), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             "/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib"}
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        roots.add(libdir)
    files = {"/etc/ld.so.cache", "/dev/null", "/dev/urandom",
             os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "pyvenv.cfg"),  # a venv's marker
             os.path.join(os.path.dirname(sys.executable), "pyvenv.cfg")}
    return (sorted(r for r in {os.path.realpath(r) for r in roots} if os.path.isdir(r)),
            sorted(f for f in files if os.path.exists(f)))


def _landlock(abi: int, workdir: str, roots: list[str], files: list[str]) -> None:
    """In the child, before exec: restrict it (and everything it runs) to reading `roots` and `files` and
    to reading and writing `workdir`. Raises OSError where a step fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0) | \
        (_LL_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: TCP bind, connect; scope:
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8                    # abstract sockets, signals
    rfd = libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        read_x = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
        for path, rights in ([(workdir, fs)] + [(r, read_x) for r in roots] +
                             [(f, (_LL_READ_FILE | (_LL_WRITE_FILE if f == "/dev/null" else 0))) for f in files]):
            try:
                fd = os.open(path, _O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = _PathBeneathAttr(rights if os.path.isdir(path) else rights & _LL_FILE_RIGHTS, fd)
                if libc.syscall(_LL_ADD_RULE, rfd, 1, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_LL_RESTRICT, rfd, ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(rfd)


_LANDLOCK: dict = {}  # "abi", "roots", "files" once checked; abi 0 = off


def _landlock_setup() -> dict:
    """Landlock's settings for this process, checked once: an interpreter started under the domain must
    run `import json` and write in its directory; otherwise Landlock stays off (with a warning)."""
    if _LANDLOCK:
        return _LANDLOCK
    abi = 0 if os.environ.get("REASONRL_SANDBOX_LANDLOCK", "1") == "0" else _landlock_abi()
    roots, files = _landlock_paths() if abi else ([], [])
    if abi:
        work = tempfile.mkdtemp(prefix="reasonrl-sandbox-check-")
        try:
            r = subprocess.run([sys.executable, "-I", "-S", "-B", "-c",
                                "import json, collections, re, math; open('ok', 'w').write('1')"],
                               cwd=work, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                               capture_output=True, timeout=30,
                               preexec_fn=lambda: _landlock(abi, work, roots, files))
            ok = r.returncode == 0 and os.path.exists(os.path.join(work, "ok"))
            why = r.stderr.decode(errors="replace")[-300:]
        except (OSError, subprocess.SubprocessError) as e:
            ok, why = False, str(e)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not ok:
            print(f"reasonrl sandbox: Landlock (ABI {abi}) is available but the interpreter could not start "
                  f"under it, so it stays off (the other layers still apply): {why.strip()}", file=sys.stderr)
            abi = 0
    _LANDLOCK.update(abi=abi, roots=roots, files=files)
    return _LANDLOCK


def _limits(cpu_s: int, memory_mb: int, file_mb: int, netns: bool, workdir: str | None = None,
            landlock: dict | None = None):
    def apply():
        os.umask(0o077)
        for res, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb << 20),
                         (resource.RLIMIT_FSIZE, file_mb << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_NPROC, 32), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (val, val))
        if netns:  # best effort: the audit hook still blocks sockets where namespaces are off
            flags = _CLONE_NEWNET | (0 if os.geteuid() == 0 else _CLONE_NEWUSER)
            ctypes.CDLL(None, use_errno=True).unshare(flags)
        if landlock and landlock["abi"]:  # after unshare (a user namespace needs no no_new_privs first)
            _landlock(landlock["abi"], workdir, landlock["roots"], landlock["files"])
    return apply


def run_tests(code: str, tests: str, *, timeout: float = 5.0, memory_mb: int = 512, file_mb: int = 16,
              network_namespace: bool = True, audit_hook: bool = True, plain_returns: bool = True,
              landlock: bool = True, max_output: int = 10_000) -> SandboxResult:
    """Run `code` then `tests` (plain asserts) in a sandboxed interpreter; passed when exit status is 0.

    plain_returns: the solution's functions and methods must return plain data (GUARD_SOURCE), so that an
    object that equals anything earns nothing; False for tests that compare objects of the solution's
    classes (a JSONL line's meta "plain_returns": false).
    audit_hook=False and landlock=False exist only so that tests can check the other layers on their own
    (REASONRL_SANDBOX_LANDLOCK=0 turns Landlock off for a whole process)."""
    if timeout <= 0:
        raise ValueError(f"run_tests: timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 32:
        raise ValueError(f"run_tests: memory_mb must be >= 32 (the interpreter needs it), got {memory_mb}")
    ll = _landlock_setup() if landlock else None
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="reasonrl-sandbox-"))
    r_pass, w_pass = os.pipe()
    try:
        with open(os.path.join(workdir, "_harness.py"), "w") as f:
            f.write(_HARNESS)
        nonce = secrets.token_hex(16)
        job = (nonce + "\n" + json.dumps({"code": code, "tests": tests, "plain_returns": bool(plain_returns)})).encode()
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "_harness.py", workdir, "1" if audit_hook else "0", str(w_pass)],
            cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(w_pass,), start_new_session=True,
            preexec_fn=_limits(int(timeout) + 1, memory_mb, file_mb, network_namespace, workdir, ll))
        os.close(w_pass)
        w_pass = None
        out, err, said, timed_out = _collect(proc, job, r_pass, start + timeout, max_output)
        _kill_group(proc.pid)  # stragglers left in the group after a normal exit
        seconds = time.monotonic() - start
        rc = proc.returncode
        completed = said.strip() == nonce.encode()
        if timed_out:
            status = "timeout"
        elif rc == 0 and completed:
            status = "passed"
        elif "MemoryError" in err:
            status = "memory"
        elif rc is not None and rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL):
            status = "timeout"
        elif rc == 0:  # exit status 0 before the tests finished (sys.exit(0), os._exit(0)): not a pass
            status = "error"
            err = (err + "\nsandbox: the program exited before its tests finished")[-max_output:]
        else:
            status = "failed" if "AssertionError" in err else "error"
        return SandboxResult(status == "passed", status, rc, out, err, seconds)
    finally:
        os.close(r_pass)
        if w_pass is not None:
            os.close(w_pass)
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc, job: bytes, r_pass: int, deadline: float, max_output: int):
    """Feed the job to stdin and read stdout, stderr and the pass channel until the child exits or the
    deadline passes (then its process group is killed). Each stream keeps its first max_output bytes
    and drops the rest as it arrives, so a program that prints without end costs no memory.
    -> (stdout, stderr, pass channel bytes, timed out)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), r_pass: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    except (BrokenPipeError, OSError):  # it died before reading its job
        pass
    timed_out = False
    open_fds = set(bufs)
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            _kill_group(proc.pid)
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            fd = key.fd
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(fd)
                open_fds.discard(fd)
                continue
            room = max_output - len(bufs[fd]) if fd != r_pass else 256 - len(bufs[fd])
            if room > 0:
                bufs[fd] += chunk[:room]
    sel.close()
    if timed_out:  # what was already written before the kill
        for fd in bufs:
            try:
                while len(bufs[fd]) < max_output and (chunk := os.read(fd, 1 << 16)):
                    bufs[fd] += chunk[:max_output - len(bufs[fd])]
            except (BlockingIOError, OSError):
                pass
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0) + 5)
    except subprocess.TimeoutExpired:  # streams closed but the process lingers: kill it
        _kill_group(proc.pid)
        proc.wait()
        timed_out = True
    dec = lambda b: bytes(b).decode(errors="replace")  # noqa: E731
    return dec(bufs[proc.stdout.fileno()]), dec(bufs[proc.stderr.fileno()]), bytes(bufs[r_pass]), timed_out


def read_line(fd: int, timeout: float) -> str | None:
    """One line from a worker's pipe within timeout seconds, stripped; None when it timed out or the
    writer closed the pipe (died). For the long-lived workers of verifier.py and rgscore.py."""
    buf, end = b"", time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0 or not _readable(fd, left):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
    return buf.decode(errors="replace").strip()


def _readable(fd: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def end_process(proc: subprocess.Popen, group: bool = False) -> None:
    """Kill a worker (its whole process group when it has its own session), reap it, close its pipes."""
    if group:
        _kill_group(proc.pid)
    else:
        proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
