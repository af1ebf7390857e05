"""math-verify (the optional `tasks` extra) behind a process boundary, for answers_equal.

Why a process: math-verify reads LaTeX into sympy and compares. On model output such as
9^{9^{9^{9}}} or 10^{100000000}, sympy evaluates the integer power in C, where no signal reaches it
(measured 2026-11-29: still running after 20 s; \\binom{10^{9}}{10^{5}} took 12.7 s), and math-verify's
own timeout is signal.alarm: whole seconds, main thread only. Here a worker process that imports only
math_verify answers one query per line; a query that outlives its timeout has the worker killed (a new
one starts on the next query) and counts as not verified. The worker's address space is capped
(_MEMORY), so a bomb of digits fails there, not in the trainer; and it runs under the sandbox's audit
hook (reasonrl/rl/sandbox.py: no process creation, sockets, ctypes or file writes), though its LaTeX
reader evaluates no Python.

Strict reading: each side is parsed whole as LaTeX ("$...$", LatexExtractionConfig only), not searched
for an answer inside free text: math-verify's default extraction finds 42 in "42abc" (or in
"1e-999999999" finds 1) and calls it equal to 42 (to 1).
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
_START_TIMEOUT = 60.0  # importing sympy and math_verify: ~1 s here; slow disks take longer
_MAX_CHARS = 1000  # longer answers are not sent (not verified)

_WORKER = "import os, sys\n" + HOOK_SOURCE + r"""
import json, logging
logging.disable(logging.WARNING)
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
except (ImportError, ValueError, OSError):
    pass
from math_verify import LatexExtractionConfig, parse, verify
cfg = [LatexExtractionConfig()]
T = 86400  # math-verify's own signal.alarm, out of the way (the parent kills; None is refused before 0.9)
verify(parse("$1$", extraction_config=cfg, parsing_timeout=T), parse("$\\frac{2}{2}$", extraction_config=cfg,
       parsing_timeout=T), timeout_seconds=T)  # its lazy imports, before the hook
sys.dont_write_bytecode = True
_install("/nonexistent/reasonrl-mathverify", True)  # the sandbox's audit hook: no writes anywhere, no processes
out = sys.stdout
out.write("ready\n")
out.flush()
for line in sys.stdin:
    try:
        gold, pred = json.loads(line)
        g = parse("$" + gold + "$", extraction_config=cfg, parsing_timeout=T)
        p = parse("$" + pred + "$", extraction_config=cfg, parsing_timeout=T)
        r = "1" if g and p and verify(g, p, timeout_seconds=T) else "0"
    except BaseException:  # parse errors, MemoryError, RecursionError: no verdict
        r = "E"
    out.write(r + "\n")
    out.flush()
""".replace("MEMORY", str(_MEMORY))


class _Worker:
    """One math-verify process, started on first use; thread-safe (one query at a time)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.broken: str | None = None  # why the worker cannot run (then every query gets None)
        self.restarts = 0  # workers killed for a timeout (tests read it)
        self.pid = os.getpid()  # a forked child must not share its parent's pipes

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, close_fds=True)
        if self._readline(_START_TIMEOUT) != "ready":
            self._kill()
            self.broken = "the math-verify worker did not start (is math-verify importable?)"
            warnings.warn(f"answers_equal: {self.broken}; LaTeX answers that reasonrl's own checks cannot "
                          "read count as not equal", RuntimeWarning, stacklevel=4)

    def _readline(self, timeout: float) -> str | None:
        return read_line(self.proc.stdout.fileno(), timeout)

    def _kill(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def query(self, gold: str, pred: str, timeout: float) -> bool | None:
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
                self.proc.stdin.write((json.dumps([gold, pred]) + "\n").encode())
                self.proc.stdin.flush()
                r = self._readline(timeout)
            except OSError:  # BrokenPipeError: it died just now
                r = None
            if r is None:  # timed out (or died on this query): killed; the next query starts another
                self._kill()
                self.restarts += 1
                return False
            return {"1": True, "0": False}.get(r)


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


def math_verify_equal(pred: str, gold: str, timeout: float = 1.0) -> bool | None:
    """math-verify's verdict on two answers read whole as LaTeX: True / False, False when it took longer
    than timeout seconds, None when math-verify is not installed, the answer is longer than _MAX_CHARS,
    or it could not parse a side."""
    if not available() or len(pred) > _MAX_CHARS or len(gold) > _MAX_CHARS:
        return None
    return worker().query(gold, pred, timeout)
