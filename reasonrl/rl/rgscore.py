"""reasoning-gym's scorers, run on model output in a sandboxed worker process.

Why: several of reasoning-gym's `score_answer` methods call eval() on the model's answer (string_insertion,
spiral_matrix, binary_matrix, n_queens in 0.1.25): in the trainer's process, an answer such as
`__import__('os').system(...)` would run, and `9**9**9**9` would never return. Model output is untrusted,
so the scoring runs in one long-lived worker with the sandbox's layers (reasonrl/rl/sandbox.py) that fit a
process which must import reasoning-gym: its own temporary working directory and session, resource limits
(address space, file size, open files, processes), a network namespace where the kernel allows it, and
the sandbox's audit hook, installed after `import reasoning_gym` and before any answer is scored (no
process creation, sockets, ctypes, or writes outside its directory). Each answer has a wall-clock
timeout; past it the worker's process group is killed, the answer scores 0, and the next one starts a
fresh worker. Scores come back on a pipe of their own; what the scorers print goes nowhere.

The worker builds the dataset from its spec (name, size, seed, options) for the scorer's configuration
and gets each entry from the trainer (pickled: the trainer's entry is the one its question came from;
regenerating it there is not enough, as polynomial_multiplication's entries differ between processes).
In the worker, the scorers that eval() the answer (_EVAL_MODULES) get ast.literal_eval in its place:
their answers are list literals, and an eval()'d answer could write a forged score to the reply pipe or
rebind builtins for every later answer. Those that hand it to sympy's parse_expr (_PARSE_MODULES; an
eval() too, and the model's code reaches it through a string it evals) get a parse_expr that refuses
dunders, attribute access, lambda and import and evaluates with no builtins. A reply that is not one score in [0, 1] scores 0 and restarts
the worker. Limit, as for the code sandbox: this filters reward computation, it is not a boundary
against a hostile human.
"""
from __future__ import annotations

import atexit
import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

from reasonrl.rl.sandbox import HOOK_SOURCE, end_process, read_line

_START_TIMEOUT = 120.0  # importing reasoning-gym: ~1.2 s here
# reasoning-gym modules (0.1.25) whose score_answer eval()s the model's answer; in the worker their
# module-level `eval` is replaced by ast.literal_eval, so that answer is parsed, never run. An answer
# that eval() ran could write a forged score to the reply pipe (its descriptor is in sys.argv) or
# rebind builtins for every later answer (float -> 1). The sandbox's layers stay for the rest.
_EVAL_MODULES = ("reasoning_gym.algorithmic.string_insertion", "reasoning_gym.algorithmic.spiral_matrix",
                 "reasoning_gym.algorithmic.binary_matrix", "reasoning_gym.games.n_queens")
# ... and those that give the answer to sympy's parse_expr, itself an eval(): a guarded parse_expr, with
# no builtins, replaces it there (and in sympy) for the worker's whole life
_PARSE_MODULES = ("reasoning_gym.games.puzzle24", "reasoning_gym.games.countdown",
                  "reasoning_gym.algebra.polynomial_multiplication", "reasoning_gym.algebra.simple_integration",
                  "reasoning_gym.algebra.intermediate_integration")
_MEMORY = 4 << 30  # address space of the worker (reasoning-gym itself needs about 0.4 GiB)

# argv: the descriptor of the reply pipe, the trainer's sys.path (JSON: reasoning-gym is imported from
# where the trainer finds it, user site or PYTHONPATH included, though -I ignores both). stdin: one JSON
# request per line: ["build", name, size, seed, options] (the dataset the next answers are scored by)
# or ["score", entry (pickled by the trainer, base64), answer]. Replies on the reply pipe: "ready", then
# one line per request: "ok" or a score, or "E message".
_WORKER = "import sys, os, json\n" + HOOK_SOURCE + r"""
def _serve():
    import base64, pickle
    reply, write = int(sys.argv[1]), os.write
    sys.path[:] = json.loads(sys.argv[2])
    sys.dont_write_bytecode = True
    import reasoning_gym  # a failure here reaches the trainer's error through stderr
    import ast, importlib

    def literal(src, *args, **kwargs):  # what these scorers eval() is a list literal, never code
        if not isinstance(src, str) or len(src) > 100_000:
            raise ValueError("not a Python literal")
        return ast.literal_eval(src.strip())
    for mod in EVAL_MODULES:  # their eval(answer) becomes a literal parse: the model's code never runs
        try:
            importlib.import_module(mod).eval = literal
        except ImportError:
            pass
    # sympy's parse_expr eval()s its (transformed) input too: the scorers that give it the answer get
    # one that refuses dunders, attribute access, lambda and import, and evaluates with no builtins
    import re, sympy
    from sympy.parsing import sympy_parser
    names = {}
    exec("from sympy import *", names)
    names["__builtins__"] = {}
    bad = re.compile(r"__|[A-Za-z_)\]]\s*\.\s*[A-Za-z_]|\blambda\b|\bimport\b")
    original = sympy_parser.parse_expr

    def parse_expr(s, local_dict=None, transformations=sympy_parser.standard_transformations,
                   global_dict=None, evaluate=True):
        if not isinstance(s, str) or len(s) > 10_000 or bad.search(s):
            raise ValueError("not a plain expression")
        return original(s, local_dict=local_dict, transformations=transformations, global_dict=dict(names),
                        evaluate=evaluate)
    sympy.parse_expr = sympy_parser.parse_expr = parse_expr
    for mod in PARSE_MODULES:  # those that imported the name itself
        try:
            m = importlib.import_module(mod)
            if hasattr(m, "parse_expr"):
                m.parse_expr = parse_expr
        except ImportError:
            pass
    ds = None
    devnull = os.open(os.devnull, os.O_WRONLY)
    _install(os.path.realpath(os.getcwd()), True)
    os.dup2(devnull, 1)  # what scorers print goes nowhere; scores use the reply pipe
    os.dup2(devnull, 2)
    write(reply, b"ready\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req[0] == "build":
                name, size, seed, options = req[1:]
                ds = None
                ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
                out = "ok"
            else:
                entry = pickle.loads(base64.b64decode(req[1]))  # from the trainer, not from the model
                out = str(float(ds.score_answer(req[2], entry)))
        except BaseException as e:  # no dataset or score, and why
            out = "E " + (type(e).__name__ + ": " + str(e)).replace("\n", " ")[:300]
        write(reply, (out + "\n").encode())
    # stdin closed (the trainer ended or died): remove the working directory, path by path (the hook
    # refuses directory descriptors, which shutil.rmtree opens)
    try:
        for top, dirs, files in os.walk(os.getcwd(), topdown=False):
            for name in files:
                os.remove(os.path.join(top, name))
            os.rmdir(top)
    except OSError:
        pass

try:
    _serve()
finally:
    del _serve, _install
""".replace("EVAL_MODULES", repr(_EVAL_MODULES)).replace("PARSE_MODULES", repr(_PARSE_MODULES))


def _limits(memory: int, netns: bool):
    def apply():
        import ctypes
        import resource
        os.umask(0o077)
        for res, val in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, 16 << 20),
                         (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_NPROC, 64), (resource.RLIMIT_CORE, 0)):
            hard = resource.getrlimit(res)[1]
            val = val if hard == resource.RLIM_INFINITY else min(val, hard)  # a lower hard limit stays
            resource.setrlimit(res, (val, val))
        if netns:  # best effort, as in the sandbox: the audit hook blocks sockets anyway
            ctypes.CDLL(None, use_errno=True).unshare(0x40000000 | (0 if os.geteuid() == 0 else 0x10000000))
    return apply


class ScoringWorker:
    """The worker process; started on first use, restarted after a timeout; one request at a time."""

    def __init__(self, memory: int = _MEMORY, network_namespace: bool = True):
        self.memory, self.netns = memory, network_namespace
        self.proc: subprocess.Popen | None = None
        self.reply: int | None = None
        self.workdir: str | None = None
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.restarts = 0  # workers killed at a timeout (tests read it)
        self.built: str | None = None  # the spec whose dataset the worker holds
        self.warned: set = set()  # datasets whose scorer failure was reported

    def _start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="reasonrl-rgscore-")
        r, w = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "HOME": self.workdir, "TMPDIR": self.workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _WORKER, str(w), json.dumps(sys.path)],
                                         cwd=self.workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, pass_fds=(w,), start_new_session=True,
                                         preexec_fn=_limits(self.memory, self.netns))
        finally:
            os.close(w)
        self.reply = r
        if self._readline(_START_TIMEOUT) != "ready":
            try:  # it exited: the last line of its traceback says why
                self.proc.wait(timeout=1)
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            except (subprocess.TimeoutExpired, OSError):
                err = [f"no reply within {_START_TIMEOUT:.0f} s"]
            self._kill()
            raise RuntimeError("reasoning-gym's scoring worker did not start: " + (err[0] if err else "it exited"))

    def _readline(self, timeout: float) -> str | None:
        return read_line(self.reply, timeout)

    def _kill(self) -> None:
        if self.proc is not None:
            end_process(self.proc, group=True)
            self.proc = None
        if self.reply is not None:
            os.close(self.reply)
            self.reply = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self.built = None

    def _ask(self, line: bytes, timeout: float) -> str | None:
        """Send one request and wait for its reply; None when the worker took longer than timeout
        seconds or died (it is killed then: the next request starts a fresh one)."""
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it died since the last request
            self._kill()
            return None
        r = self._readline(timeout)
        if r is None:
            self._kill()
        return r

    def score(self, spec: tuple, entry: dict, answer: str | None, timeout: float) -> float:
        """reasoning-gym's score of `answer` for `entry` of the dataset `spec` = (name, size, seed,
        options). 0.0 when it takes longer than timeout seconds, and when the scorer raises (a warning
        names the dataset and the error, once per dataset)."""
        name = spec[0]
        key = json.dumps(list(spec), sort_keys=True)
        line = (json.dumps(["score", base64.b64encode(pickle.dumps(entry)).decode(), answer]) + "\n").encode()
        with self.lock:
            if self.pid != os.getpid():  # forked since: this process starts its own
                self.proc, self.reply, self.workdir, self.pid, self.built = None, None, None, os.getpid(), None
            if self.proc is not None and self.proc.poll() is not None:  # died since the last answer
                self._kill()
            if self.proc is None:
                self._start()
            if self.built != key:  # the dataset first, with the start budget (no model output in it)
                r = self._ask((json.dumps(["build", *spec]) + "\n").encode(), _START_TIMEOUT)
                if r != "ok":
                    raise RuntimeError(f"reasoning-gym {name}: the scoring worker could not build the dataset "
                                       f"{spec}: {'no reply' if r is None else r[2:]}")
                self.built = key
            r = self._ask(line, timeout)
            if r is not None and not r.startswith("E ") and not _one_score(r):
                self._kill()  # several lines or not a number: the protocol was tampered with
                r = None
            if r is None:  # past the timeout, it died on this answer, or its reply was not one score: 0
                self.restarts += 1
                return 0.0
            if r.startswith("E "):
                if name not in self.warned:
                    self.warned.add(name)
                    warnings.warn(f"reasoning-gym {name}: its scorer raised on a model answer (scored 0; "
                                  f"reported once): {r[2:]}", RuntimeWarning, stacklevel=3)
                return 0.0
            return float(r)


def _one_score(r: str) -> bool:
    try:
        return "\n" not in r and 0.0 <= float(r) <= 1.0
    except ValueError:
        return False


_WORKERS: list[ScoringWorker] = []


def worker() -> ScoringWorker:
    if not _WORKERS:
        _WORKERS.append(ScoringWorker())
        atexit.register(lambda: _WORKERS[0]._kill())
    return _WORKERS[0]


def score(spec: tuple, entry: dict, answer: str | None, timeout: float = 3.0) -> float:
    """reasoning-gym's score of a model's answer, computed in the sandboxed worker (module docstring)."""
    return worker().score(spec, entry, answer, timeout)

