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
   interpreter reads only its own files (the executable, libpython, the standard library's files but
   not site-packages, and of its extension modules not those in _UNREADABLE_EXTENSIONS: process
   creation, ctypes, sockets, the _test* modules), the system's shared libraries, and writes only in
   the working directory, so the trainer's files, checkpoints, keys and /etc stay unreadable and those
   extension modules cannot be loaded under any name; TCP bind/connect are refused (ABI >= 4), and
   signals to processes outside the sandbox (the trainer) are refused (ABI >= 6). It is checked once
   per process (an interpreter that cannot start under it turns it off, with a warning). Landlock
   does not cover chmod, chown, utime or xattrs: as root, layer 4 alone stops those outside;
4. an audit hook (PEP 578) installed before the untrusted code runs, which cannot be removed and
   whose rules live in a closure the code cannot reach or patch: it refuses process creation
   (os.fork, os.system, os.exec*, os.posix_spawn, subprocess), sockets, ctypes / native-library
   loading (an import is checked by every part of its name and by its file), symlinks, opening
   directories (and O_PATH / O_DIRECTORY opens), sqlite3, audit hooks of the solution's own (one read
   the tests' code object at its exec), and any write, rename, removal, mkdir, chmod, chown, utime or
   xattr change outside the working directory (paths only as plain str/bytes; no dir_fd); calls that
   raise no audit event (mkfifo, mknod, pidfd_open / pidfd_send_signal, which could signal the
   trainer) are deleted from their modules (a fresh copy of the posix module brings them back: Landlock
   then refuses them outside); the tests run with the harness's exec and the builtins as they were
   before the solution ran (a solution that made exec a no-op passed tests that never ran);
5. a wall-clock timeout, after which the whole process group is killed (start_new_session=True,
   os.killpg), so children that slipped through die with it; output past max_output is dropped as
   it arrives.
A pass is exit status 0 *and* a nonce the harness writes to a channel of its own after the tests
ran; the tests reach the child through a pipe, never its directory. So sys.exit(0) before the
tests, printing a verdict, or reading the tests' expected values earn nothing. The tests see the
solution's functions and methods through a guard that hands them plain copies of the results (see
GUARD_SOURCE; exact Fraction, Decimal, deque and dates too), and its classes through a subclass whose
every public attribute is checked: an object whose __eq__ is always True earns nothing either (plain_returns=False turns
the guard off, for tests that compare objects of the solution's own classes). In either mode the tests'
names of builtins (all, sorted, abs, len, ...) are the builtins, whatever the solution defined under
them (its own code keeps its definitions; an entry point named like a builtin cannot be tested).
This is a filter for reward computation, not a security boundary for hostile humans: use a
container or VM when that is the threat. Known limits, by design of an in-process harness: frames are
readable (namedtuple, typing and enum need sys._getframe), so code that walks up to the harness's
frame can read the nonce, or the calling test's frame and its constants. Patches to the standard library
(math.isclose, fractions.Fraction.__eq__) are put back before the tests, and after each call the tests
make into the solution (with plain_returns; without it, before the tests only), for the modules loaded
before the solution ran (the common ones are preloaded: _PRELOAD) and the Python classes of those the
tests compare with (_CLASSES_OF), not for a module the solution is first to import.
"""
from __future__ import annotations

import ctypes
import functools
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
    def _install(root, hook_on, ext_dir=None):
        blocked = frozenset({
            "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "ctypes.dlopen",
            "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg", "signal.pthread_kill", "sys.setprofile",
            "sys.settrace", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
            "os.symlink", "sys.monitoring.register_callback", "sqlite3.connect", "sys.addaudithook"})
        # (sys.addaudithook: a hook of the solution's own saw the tests' code object at their exec and read
        # the expected answers out of its constants)
        no_import = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "pty",
                               "multiprocessing", "_multiprocessing", "resource", "sqlite3", "_sqlite3",
                               "_testcapi", "_testinternalcapi", "_xxsubinterpreters", "_posixshmem", "_lsprof"})
        # event -> positions of its path arguments (the rest: modes, ids, times, dir_fd)
        path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
                       "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "os.chdir": (0,),
                       "os.chroot": (0,), "os.rename": (0, 1), "os.link": (0, 1), "shutil.move": (0, 1),
                       "shutil.copyfile": (0, 1), "shutil.copytree": (0, 1), "os.setxattr": (0,),
                       "os.removexattr": (0,)}
        # event -> positions of its dir_fd arguments: a directory descriptor moves the base of a relative
        # path away from the one the check resolves (opening directories is refused, but a rename race
        # could slip one through the check)
        dir_fd_args = {"os.chmod": (2,), "os.chown": (3,), "os.utime": (3,), "os.mkdir": (2,), "os.rmdir": (1,),
                       "os.remove": (1,), "os.link": (2, 3), "os.rename": (2, 3)}
        W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        NO_FLAGS = getattr(os, "O_PATH", 0) | getattr(os, "O_DIRECTORY", 0)

        def inside(p, fd_ok=True, getcwd=os.getcwd, type=type, int=int, str=str, bytes=bytes):
            # Only exact int (an already-open descriptor, opened under this same hook: for open() and
            # truncate; chmod, chown, utime, xattrs and chdir of a descriptor are refused, since one opened
            # for reading can name a file outside), str or bytes: a
            # PathLike's __fspath__ or a str subclass could show the hook one path and the call another.
            # Lexical: no symlink can be made (os.symlink is refused), no directory opened (so no dir_fd
            # or fchdir moves the base of a relative path), and a hard link is checked at its source, so
            # the text of the path is where the write lands.
            t = type(p)
            if t is int:
                return fd_ok
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
            if event == "import":
                # every part of the name and the file's own name: an extension module loaded from its file
                # under another name ("ok._posixsubprocess") still had its init function, and no event
                name, file = str(args[0]), args[1] if len(args) > 1 else None
                if any(part in no_import for part in str.split(name, ".")) or (
                        type(file) is str and str.split(str.rsplit(file, "/", 1)[-1], ".")[0] in no_import):
                    raise PermissionError("sandbox: import " + name + " is not allowed")
                # extension modules only from the interpreter's own lib-dynload (the system Python's
                # _cffi_backend called into C)
                if ext_dir is not None and type(file) is str and str.endswith(file, (".so", ".pyd")) and \
                        str.rsplit(file, "/", 1)[0] != ext_dir:
                    raise PermissionError("sandbox: extension module " + name + " from outside the standard "
                                          "library is not allowed")
            if event == "open":
                path, mode, flags = args
                if (flags or 0) & NO_FLAGS:
                    raise PermissionError("sandbox: O_PATH / O_DIRECTORY opens are not allowed")
                writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & W
                if is_dir(path):  # no directory descriptors: a dir_fd would move the base of a relative path
                    raise PermissionError("sandbox: opening a directory (" + repr(path) + ") is not allowed")
                if writing and not inside(path):
                    raise PermissionError("sandbox: writing " + repr(path) + " outside the working directory "
                                          "(or not a str path)")
            elif event in path_events:
                fd_ok = event == "os.truncate"
                for i in path_events[event]:
                    if i < len(args) and not inside(args[i], fd_ok):
                        raise PermissionError("sandbox: " + event + " on " + repr(args[i]) +
                                              " outside the working directory (or not a str path)")
                for i in dir_fd_args.get(event, ()):
                    if i < len(args) and args[i] is not None and args[i] != -1:
                        raise PermissionError("sandbox: " + event + " with a dir_fd is not allowed")

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
    def _make_guard(after_call, type=type, issubclass=issubclass, dict=dict, list=list, tuple=tuple, set=set,
                    frozenset=frozenset, int=int, float=float, str=str, bytes=bytes, complex=complex,
                    bool=bool, staticmethod=staticmethod, classmethod=classmethod,
                    vars=vars, callable=callable, isinstance=isinstance, FunctionType=type(lambda: 0),
                    ModuleType=type(sys), BuiltinType=type(len), Exception=Exception, modules=sys.modules,
                    module_of=type.__dict__["__module__"].__get__, name_of=type.__dict__["__name__"].__get__,
                    mro_of=type.__dict__["__mro__"].__get__, getattr=getattr, id=id, object=object,
                    AttributeError=AttributeError, any=any):
        scalars = frozenset(map(id, (bool, int, float, complex, str, bytes, type(None))))  # by identity:
        # `t in (int, ...)` compares with ==, which a metaclass's __eq__ answers
        # exact values of the standard library, as tests compare with them: immutable C types as they are;
        # a Fraction or a deque rebuilt from plain parts (their classes are put back after each call)
        import collections as _c, datetime as _dt, decimal as _d, fractions as _f
        immutable = frozenset(map(id, (_d.Decimal, _dt.date, _dt.datetime, _dt.time, _dt.timedelta)))
        Fraction, deque = _f.Fraction, _c.deque
        depth = [0]

        class NotPlainData(BaseException):  # not an Exception, not a TypeError: a test that expects one to
            pass                            # be raised must not pass on this

        def plain(v, name, level=0):
            t = type(v)
            if id(t) in scalars:
                return v
            if level > 64:
                raise NotPlainData(f"{name}() returned data nested more than 64 levels deep")
            if id(t) in immutable:
                return v
            if t is Fraction:
                return Fraction(plain(v.numerator, name, level + 1), plain(v.denominator, name, level + 1))
            if t is deque:
                return deque([plain(x, name, level + 1) for x in deque.__iter__(v)], v.maxlen)
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
                    after_call()  # the standard library put back after each call from the tests too
                return plain(out, name)
            return checked

        def guard_class(v, key):
            # The subclass of solution class v the tests get. Every public attribute the tests read (at depth
            # 0) goes through its __getattribute__ (and __getattr__): callables come back checked, data as
            # plain copies, whatever supplied them (a property, the instance's dict, a callable class
            # attribute, a partial, the solution's __getattr__). A metaclass checks that constructing it
            # gives an instance of it (a __new__ that returned another object), each checked call that the
            # instance kept its class (self.__class__ = Other), and both that nothing replaced these hooks.
            meta = type(v)
            sub_box = []

            def ga(self, name):
                val = object.__getattribute__(self, name)
                if depth[0] or name[:1] == "_":
                    return val
                return public(self, name, val)

            def gattr(self, name):
                for klass in mro_of(v):  # the solution's own __getattr__, if any: its results are checked too
                    f = vars(klass).get("__getattr__")
                    if f is not None and klass is not object:
                        val = f(self, name)
                        return val if depth[0] or name[:1] == "_" else public(self, name, val)
                raise AttributeError(name)

            def public(self, name, val):
                intact(self)
                if callable(val) and not isinstance(val, type):
                    fn = wrap(val, f"{key}.{name}")

                    def method(*a, **k):
                        out = fn(*a, **k)
                        intact(self)
                        return out
                    return method
                return plain(val, f"{key}.{name}")

            hooks = {"__getattribute__": ga, "__getattr__": gattr}

            def hooks_replaced():
                return any(vars(sub_box[0]).get(k) is not f for k, f in hooks.items())

            def intact(obj):
                if type(obj) is not sub_box[0] or hooks_replaced():
                    raise NotPlainData(f"an instance of {key} changed its class or its attribute lookup; the "
                                       "tests compare plain values (plain_returns: false for tests that need it)")

            def call(cls, *a, **k):
                obj = meta.__call__(cls, *a, **k)
                if cls is sub_box[0] and not depth[0]:
                    intact(obj)
                return obj

            def meta_ga(cls, name):
                val = meta.__getattribute__(cls, name)
                if depth[0] or name[:1] == "_" or cls is not sub_box[0]:
                    return val
                if callable(val) and not isinstance(val, type):
                    return wrap(val, f"{key}.{name}")
                return plain(val, f"{key}.{name}")

            M = meta(f"Guarded{name_of(meta)}", (meta,), {"__call__": call, "__getattribute__": meta_ga,
                                                            "__module__": "__main__"})
            sub = M(v.__name__, (v,), {**hooks, **identity, "__module__": "__main__",
                                       "__qualname__": v.__qualname__})
            sub_box.append(sub)
            if hooks_replaced():  # an __init_subclass__ replaced them
                raise NotPlainData(f"class {key} changed the subclass the tests get (__init_subclass__)")
            return sub

        # what the tests' instances of a solution class compare and hash by: identity (object's), whatever
        # the class says. A class whose instances should compare by value: plain_returns=False.
        identity = {m: getattr(object, m) for m in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
                                                     "__hash__")}

        def imported(c):
            mod = module_of(c)  # read past any metaclass property
            return type(mod) is str and mod != "__main__" and getattr(modules.get(mod), name_of(c), None) is c

        def guarded(ns):
            out = dict(ns)
            for key, v in ns.items():
                if key.startswith("_"):  # private helpers (and namedtuple's _make, _replace): the tests' API is public
                    continue
                if isinstance(v, type):
                    if imported(v):
                        continue  # imported (from collections import Counter, ...): as it is
                    if not imported(type(v)):  # its __call__ could hand the tests anything
                        raise NotPlainData(f"class {key} has a metaclass of the solution's own; the tests "
                                           "compare plain values (plain_returns: false for tests that need it)")
                    try:  # a class of the solution's: the tests get a guarded subclass (guard_class)
                        out[key] = guard_class(v, key)
                    except NotPlainData:
                        raise
                    except Exception:  # a class that cannot be subclassed (an Enum, a metaclass's doing): as it is
                        pass
                elif type(v) is BuiltinType:  # a C function: a bound method of an object (the solution's
                    if type(getattr(v, "__self__", None)) is not ModuleType:  # dict's __getitem__) is checked,
                        out[key] = wrap(v, key)                               # a module's (math.gcd) is not
                elif type(v) is not ModuleType and callable(v):
                    out[key] = wrap(v, key)  # functions, lambdas, lru_cache wrappers, partials, callable objects
            return out
        return guarded
""")

_HARNESS = "import sys, os, json\n" + HOOK_SOURCE + GUARD_SOURCE + textwrap.dedent(r"""
    # The standard library as the tests will use it, loaded and recorded before the solution runs, and put
    # back after it: a solution that set fractions.Fraction.__eq__ (or math.isclose) to say True passed
    # tests comparing with a Fraction (or calling isclose). Module attributes and the attributes of the
    # Python classes they define; C types cannot be patched anyway.
    _CLASSES_OF = ("fractions", "collections", "numbers", "abc", "collections.abc", "functools", "statistics",
                   "decimal", "operator")
    _PRELOAD = ("math", "cmath", "collections", "itertools", "functools", "heapq", "bisect", "re", "fractions",
                "decimal", "string", "typing", "random", "statistics", "operator", "copy", "dataclasses", "enum")

    def _snapshot_stdlib(ModuleType=type(sys), type=type, dict=dict, isinstance=isinstance, tuple=tuple):
        for m in _PRELOAD:
            try:
                __import__(m)
            except Exception:
                pass
        snap = []
        for name in _PRELOAD + ("numbers", "abc", "collections.abc"):
            mod = sys.modules.get(name)
            if type(mod) is not ModuleType:
                continue
            d = mod.__dict__
            snap.append((d, dict(d), tuple(d), tuple(d.values())))
            for c in list(d.values()):  # the classes a test compares with or checks against (the others'
                if isinstance(c, type) and c.__dict__.get("__module__") == name and name in _CLASSES_OF:
                    cd = c.__dict__  # would cost each call's restore for nothing)
                    snap.append((c, dict(cd), tuple(cd), tuple(cd.values())))
        return snap

    def _restore_stdlib(snap, setattr=type.__setattr__, delattr=type.__delattr__, list=list, all=all, map=map,
                        is_=__import__("operator").is_, len=len, type=type, dict=dict, Exception=Exception):
        # Unchanged (the same key and value objects, in order: identity, no user code runs) is the common
        # case, checked at C speed; else put back. Classes through type's own setattr (a metaclass's
        # __setattr__, patched, could refuse).
        for obj, saved, keys, vals in snap:
            plain_dict = type(obj) is dict
            d = obj if plain_dict else obj.__dict__
            if len(d) == len(keys) and all(map(is_, d, keys)) and all(map(is_, d.values(), vals)):
                continue
            put, drop = (dict.__setitem__, dict.__delitem__) if plain_dict else (setattr, delattr)
            for k in list(d):
                if k not in saved:
                    try:
                        drop(obj, k)
                    except Exception:  # a C type's slots
                        pass
            for k, v in saved.items():
                if d.get(k, d) is not v:
                    try:
                        put(obj, k, v)
                    except Exception:  # __dict__, __weakref__, a C type's slots
                        pass

    class SolutionStillRunning(BaseException):  # not an Exception: no except clause of the tests takes it
        pass

    def _make_quiet(snap, restore):
        # What runs between the solution's code and the tests' comparisons, made to stop: threads the
        # solution left running, gc callbacks (with the collector off), interval timers. A thread or a gc
        # callback that patched Fraction.__eq__ or math.isclose in a loop beat the restore and passed.
        # Then the standard library is put back.
        import _thread, gc, signal
        count, callbacks, disable, setitimer = _thread._count, gc.callbacks, gc.disable, signal.setitimer
        timers = [getattr(signal, t) for t in ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF") if hasattr(signal, t)]

        def quiet():
            if count():
                raise SolutionStillRunning("the solution left threads running into the tests (join them before "
                                           "returning)")
            del callbacks[:]
            disable()
            for t in timers:
                setitimer(t, 0)
            restore(snap)
        return quiet

    def _run():
        os.unlink(sys.argv[0])  # this file: nothing in the working directory tells how the verdict is made
        nonce = sys.stdin.readline().strip()
        job = json.loads(sys.stdin.read())
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        fd, write = int(sys.argv[3]), os.write
        code = (compile(job["code"], "solution.py", "exec"), compile(job["tests"], "tests.py", "exec"))
        limit, set_limit = sys.getrecursionlimit, sys.setrecursionlimit  # bound before the solution runs
        quiet = _make_quiet(_snapshot_stdlib(), _restore_stdlib)
        guarded = _make_guard(quiet) if job.get("plain_returns", True) else None
        _install(os.path.realpath(sys.argv[1]), sys.argv[2] == "1", job.get("ext_dir"))
        # Taken before the solution runs, which can rebind names in the builtins module (a solution
        # that set builtins.exec to a no-op passed tests that never ran): the tests run with the
        # harness's exec and a copy of the builtins as they were.
        run, builtins_then = exec, dict(vars(__builtins__) if not isinstance(__builtins__, dict) else __builtins__)
        builtin_names = [k for k in builtins_then if not k.startswith("__")]
        stdlib_names, modules = getattr(sys, "stdlib_module_names", frozenset()), sys.modules
        ns = {"__name__": "__main__", "__builtins__": dict(builtins_then)}
        run(code[0], ns)  # the solution, then the tests in its namespace (compiled apart: the solution's
        # text cannot swallow the tests, e.g. with an open string)
        if guarded:  # a checked method that recurses through self pays a wrapper frame a level: room for it
            set_limit(max(limit(), 2100))
        quiet()
        view = guarded(ns) if guarded else dict(ns)  # (a copy: the solution's own globals stay as they are)
        for name in builtin_names:  # the tests' all, sorted, abs, len ... are the builtins, whatever the solution
            view.pop(name, None)    # defined under those names (`def all(it): return True` passed every
        for name in list(view):     # `assert all(...)`); and a stdlib module's name is that module (a class
            if name in stdlib_names and view[name] is not modules.get(name):  # named math whose isclose says
                view.pop(name)      # True passed `math.isclose(f(2), 4)` in tests that use the solution's import)
        view["__builtins__"] = dict(builtins_then)  # the tests' own copy: no solution code holds it (it edited
        run(code[1], view)                          # the shared one through globals()["__builtins__"])
        sys.stdout.flush()
        write(fd, (nonce + "\n").encode())

    try:
        _run()
    finally:
        del _run, _install, _make_guard, _snapshot_stdlib, _restore_stdlib, _make_quiet
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


# Extension modules the child may not even read (so not load, whatever name it imports them under):
# process creation without an audit event (_posixsubprocess.fork_exec), foreign calls, sockets (unix
# ones, which Landlock's ABI leaves open), raw memory (the _test* modules), limits, terminals.
_UNREADABLE_EXTENSIONS = frozenset({
    "_ctypes", "_ctypes_test", "_posixsubprocess", "_socket", "_ssl", "_multiprocessing", "_posixshmem",
    "_sqlite3", "_lsprof", "_testbuffer", "_testcapi", "_testclinic", "_testimportmultiple", "_testinternalcapi",
    "_testmultiphase", "_testsinglephase", "_xxsubinterpreters", "_xxinterpchannels", "_xxtestfuzz", "_tkinter",
    "_curses", "_curses_panel", "readline", "resource", "termios", "ossaudiodev", "nis", "spwd", "syslog",
    "xxlimited", "xxlimited_35"})


def _landlock_paths() -> list[tuple[str, int]]:
    """(path, rights) rules for what the interpreter needs to start and import its standard library: the
    executable, libpython, the standard library's files (not site-packages; in lib-dynload only the
    extension modules not in _UNREADABLE_EXTENSIONS), the system's shared libraries and the dynamic
    loader, a few device files. Directories under the standard library can be listed (the import system
    does), not read. Nothing else outside the working directory is readable."""
    import sysconfig
    rx, r = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR, _LL_READ_FILE
    rules: dict[str, int] = {}

    def add(path, rights):
        path = os.path.realpath(path)
        if os.path.exists(path):
            rules[path] = rules.get(path, 0) | (rights if os.path.isdir(path) else rights & _LL_FILE_RIGHTS)
    add(sys.executable, _LL_EXECUTE | r)
    for d in ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib"):
        real = os.path.realpath(d)
        if real.startswith(os.path.realpath(sys.base_prefix) + os.sep) or not os.path.isdir(real):
            continue  # (a Python installed under /usr/local: its lib/ is listed file by file below)
        add(real, _LL_READ_DIR)
        for entry in os.listdir(real):  # entry by entry, without the Python installations there: the system
            if not entry.startswith("python"):  # Python's dist-packages had _cffi_backend (calls into C)
                add(os.path.join(real, entry), rx)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED") and os.path.isdir(libdir):
        for f in os.listdir(libdir):
            if f.startswith("libpython"):
                add(os.path.join(libdir, f), _LL_EXECUTE | r)
    for std in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}:
        std = os.path.realpath(std)
        if not os.path.isdir(std):
            continue
        add(std, _LL_READ_DIR)
        for entry in os.listdir(std):
            if entry in ("site-packages", "dist-packages"):
                continue
            path = os.path.join(std, entry)
            if entry == "lib-dynload" and os.path.isdir(path):
                for f in os.listdir(path):
                    if f.split(".")[0] not in _UNREADABLE_EXTENSIONS:
                        add(os.path.join(path, f), _LL_EXECUTE | r)
            else:
                add(path, rx)
    for f in ("/etc/ld.so.cache", "/dev/urandom",
              os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "pyvenv.cfg"),  # a venv's marker
              os.path.join(os.path.dirname(sys.executable), "pyvenv.cfg")):
        add(f, r)
    add("/dev/null", r | _LL_WRITE_FILE)
    return sorted(rules.items())


def _landlock(abi: int, workdir: str, rules: list[tuple[str, int]]) -> None:
    """In the child, before exec: restrict it (and everything it runs) to `rules` (path, rights) and to
    reading and writing `workdir`. Raises OSError where a step fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0) | \
        (_LL_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: TCP bind, connect; scope:
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8                    # abstract sockets, signals
    rfd = libc.syscall(_LL_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for path, rights in [(workdir, fs)] + list(rules):
            try:
                fd = os.open(path, _O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = _PathBeneathAttr(rights & fs, fd)
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


_LANDLOCK: dict = {}  # "abi", "rules" once checked; abi 0 = off


def _landlock_setup() -> dict:
    """Landlock's settings for this process, checked once: an interpreter started under the domain must
    run `import json` and write in its directory; otherwise Landlock stays off (with a warning)."""
    if _LANDLOCK:
        return _LANDLOCK
    abi = 0 if os.environ.get("REASONRL_SANDBOX_LANDLOCK", "1") == "0" else _landlock_abi()
    rules = _landlock_paths() if abi else []
    if abi:
        work = tempfile.mkdtemp(prefix="reasonrl-sandbox-check-")
        try:
            r = subprocess.run([sys.executable, "-I", "-S", "-B", "-c",
                                "import json, collections, re, math; open('ok', 'w').write('1')"],
                               cwd=work, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                               capture_output=True, timeout=30,
                               preexec_fn=lambda: _landlock(abi, work, rules))
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
    _LANDLOCK.update(abi=abi, rules=rules)
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
            _landlock(landlock["abi"], workdir, landlock["rules"])
    return apply


@functools.cache
def _ext_dir() -> str | None:
    """The directory of the interpreter's own extension modules (lib-dynload), as the import system
    names their files; None where there is none (everything built in). Found once per process."""
    import importlib.machinery
    spec = importlib.machinery.PathFinder.find_spec("_json")
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


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
        job = (nonce + "\n" + json.dumps({"code": code, "tests": tests, "plain_returns": bool(plain_returns),
                                          "ext_dir": _ext_dir()})).encode()
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
    try:  # (it waited 5 s past the deadline for a program that closed its streams and slept on)
        proc.wait(timeout=max(deadline - time.monotonic(), 0) + (0.5 if not timed_out else 5))
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
