"""sympy and math-verify behind a process boundary, for answers_equal.

Why a process: both read an answer into sympy and compare. sympy evaluates integer powers in C, where
no signal reaches it: math-verify on 9^{9^{9^{9}}} or 10^{100000000} was still running after 20 s
(\\binom{10^{9}}{10^{5}} took 12.7 s), and sympy's simplify on "(x+y+1)**64*(x-y)**64" takes 19 s in
Python, where SIGALRM could stop it, but only on the main thread (measured 2026-11-29). Here one
worker process answers one query per line; a query that outlives its timeout has the worker killed
(a new one starts on the next query) and counts as not verified. This holds in any thread. The
worker's address space is capped (_MEMORY), so a bomb of digits fails there, not in the trainer; and
it runs under the sandbox's audit hook (reasonrl/rl/sandbox.py: no process creation, sockets, ctypes
or file writes), which backs up the AST check that answers_equal makes before sympify (an eval).

Two kinds of query:
- "sympy": sympify both sides (already through rewards._safe_expr) and simplify their difference.
- "latex" (math-verify, the optional `tasks` extra): each side is parsed whole as LaTeX ("$...$",
  LatexExtractionConfig only), not searched for an answer inside free text: math-verify's default
  extraction finds 42 in "42abc" (or 1 in "1e-999999999") and calls it equal to 42 (to 1).
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import subprocess
import sys
import threading
import warnings

from reasonrl.rl.sandbox import HOOK_SOURCE, end_process, read_line

_MEMORY = 4 << 30  # the worker's RLIMIT_AS (sympy and math_verify need about 0.3 GiB)
_START_TIMEOUT = 60.0  # importing sympy and math_verify: ~1.5 s here; slow disks take longer
_MAX_CHARS = 1000  # longer LaTeX answers are not sent (not verified)

_WORKER = "import os, sys\n" + HOOK_SOURCE + r"""
import json, logging
logging.disable(logging.WARNING)
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
except (ImportError, ValueError, OSError):
    pass
import sympy
sympy.simplify(sympy.sympify("sqrt(2)/2") - sympy.sympify("1/sqrt(2)"))  # its lazy imports, before the hook
try:
    from math_verify import LatexExtractionConfig, parse, verify
except ImportError:
    parse = None
if parse is not None:
    cfg = [LatexExtractionConfig()]
    T = 86400  # math-verify's own signal.alarm, out of the way (the parent kills; None is refused before 0.9)
    verify(parse("$1$", extraction_config=cfg, parsing_timeout=T), parse("$\\frac{2}{2}$", extraction_config=cfg,
           parsing_timeout=T), timeout_seconds=T)
sys.dont_write_bytecode = True
_install("/nonexistent/reasonrl-verifier", True)  # the sandbox's audit hook: no writes anywhere, no processes
out = sys.stdout
out.write("ready\n")
out.flush()
for line in sys.stdin:
    try:
        kind, a, b = json.loads(line)
        if kind == "sympy":
            r = "1" if sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0 else "0"
        elif parse is None:
            r = "N"
        else:  # a: gold, b: prediction
            g = parse("$" + a + "$", extraction_config=cfg, parsing_timeout=T)
            p = parse("$" + b + "$", extraction_config=cfg, parsing_timeout=T)
            r = "1" if g and p and verify(g, p, timeout_seconds=T) else "0"
    except BaseException:  # parse errors, MemoryError, RecursionError: no verdict
        r = "E"
    out.write(r + "\n")
    out.flush()
""".replace("MEMORY", str(_MEMORY))


class _Worker:
    """One checking process, started on first use; thread-safe (one query at a time)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.broken: str | None = None  # why the worker cannot run (then every query gets None)
        self.restarts = 0  # workers killed for a timeout (tests read it)
        self.pid = os.getpid()  # a forked child must not share its parent's pipes

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, close_fds=True,
                                     start_new_session=True)  # a terminal's Ctrl-C is the trainer's alone: it
        # reached the worker too, which then judged an equal pair unequal in the step being finished
        if self._readline(_START_TIMEOUT) != "ready":
            self._kill()
            self.broken = "the answer-checking worker (sympy, math-verify) did not start"
            warnings.warn(f"answers_equal: {self.broken}; sympy now runs in this process (a timeout only on "
                          "the main thread) and LaTeX that reasonrl's own checks cannot read counts as not equal",
                          RuntimeWarning, stacklevel=4)

    def _readline(self, timeout: float) -> str | None:
        return read_line(self.proc.stdout.fileno(), timeout)

    def _kill(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def query(self, kind: str, a: str, b: str, timeout: float) -> str | None:
        """The worker's reply ("1" equal, "0" not, "E" it raised, "N" math-verify missing), "T" when it
        took longer than timeout seconds (killed), None when the worker cannot run."""
        with self.lock:
            if self.pid != os.getpid():  # forked since: this process starts its own worker
                self.proc, self.pid = None, os.getpid()
            if self.proc is not None and self.proc.poll() is not None:  # died since the last query
                self._kill()
            if self.proc is None and self.broken is None:
                self._start()
            if self.broken is not None:
                return None
            try:
                self.proc.stdin.write((json.dumps([kind, a, b]) + "\n").encode())
                self.proc.stdin.flush()
                r = self._readline(timeout)
            except OSError:  # BrokenPipeError: it died just now
                r = None
            if r is None:  # timed out (or died on this query): killed; the next query starts another
                self._kill()
                self.restarts += 1
                return "T"
            return r


_WORKERS: list[_Worker] = []
_AVAILABLE: list[bool] = []


def available() -> bool:
    """Whether math-verify is installed (looked up once; the import happens in the worker)."""
    if not _AVAILABLE:
        _AVAILABLE.append(importlib.util.find_spec("math_verify") is not None and os.name == "posix")
    return _AVAILABLE[0]


def worker() -> _Worker:
    if not _WORKERS:
        _WORKERS.append(_Worker())
        atexit.register(lambda: _WORKERS[0]._kill())
    return _WORKERS[0]


def sympy_equal(a: str, b: str, timeout: float = 1.0) -> bool | None:
    """sympy's verdict on two expressions that passed rewards._safe_expr: True / False (False also when
    sympy raised or took longer than timeout seconds), None when the worker cannot run here (the
    caller falls back to sympy in its own process)."""
    if os.name != "posix":
        return None
    r = worker().query("sympy", a, b, timeout)
    return None if r is None else r == "1"


def math_verify_equal(pred: str, gold: str, timeout: float = 1.0) -> bool | None:
    """math-verify's verdict on two answers read whole as LaTeX: True / False, False when it took longer
    than timeout seconds, None when math-verify is not installed, the answer is longer than _MAX_CHARS,
    or it could not parse a side."""
    if not available() or len(pred) > _MAX_CHARS or len(gold) > _MAX_CHARS:
        return None
    return {"1": True, "0": False, "T": False}.get(worker().query("latex", gold, pred, timeout))
