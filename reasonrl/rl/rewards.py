"""Rewards: answer extraction, verified answer equivalence, format reward, custom reward functions.

A reward function is `fn(response: str, problem: Problem) -> float`. The accuracy reward is
*verified*, not string-matched: "0.50", "1/2" and "\\frac{1}{2}" all equal "0.5".

Rules (documented because model output is adversarial):
- extract_answer: the content of the LAST complete <answer>...</answer> pair; with nested tags
  ("<answer><answer>5</answer></answer>") the innermost pair that closes last wins. Without answer
  tags, the last \\boxed{...} (braces balanced). A \\boxed{} inside the answer tags is unwrapped.
  Nothing found -> None (reward 0).
- Unicode digits (any Unicode category Nd, e.g. Arabic-Indic "٤٢") are mapped to ASCII after NFKC
  normalization, so "٤٢" == "42" consistently on both sides.
- A learned reward model ("rm:FOLDER" raw score, "rm_sigmoid:FOLDER" squashed to (0, 1)): a local
  Hugging Face sequence-classification checkpoint scores "question\nresponse" (the logit of label 0,
  the only one for a 1-label head), batched under no_grad, loaded once per folder (RewardModel).
- Huge numbers never hang: integers compare exactly as digit strings past 4000 digits (Python's
  int() refuses > 4300), decimal exponents beyond +-1000 are rejected, and symbolic expressions go to
  sympy only after an AST check (_safe_expr: + - * / and powers with a literal exponent <= 64, a
  bounded size, <= 200 characters).
- A problem whose checker is "number" (the built-in multiply and add tasks) takes a plain number only
  (an integer, a decimal, a/b): sympy would find "560*5", the question itself, equal to 2800, and a
  policy could learn to copy its prompt.
- Order: equal text, then exact numbers, then sympy on Python-syntax expressions; only where a side is
  none of these (LaTeX such as \\frac{\\sqrt{2}}{2}, intervals, sets) math-verify decides, when that
  optional package is installed, each side read whole as LaTeX. sympy and math-verify run in a worker
  process that is killed past the timeout, in any thread (reasonrl/rl/verifier.py: sympy's big-integer
  powers ignore signals, and signals reach only the main thread). Without math-verify such answers
  count as not equal.
"""
from __future__ import annotations

import ast
import importlib
import math
import os
import re
import signal
import sys
import threading
import unicodedata
from fractions import Fraction
from typing import Callable

# innermost pairs: the content may not contain another answer tag
_ANSWER_PAIR = re.compile(r"<answer>((?:(?!<answer>|</answer>).)*)</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_MAX_INT_DIGITS = 4000
_MAX_EXPONENT = 1000


# ----------------------------------------------------------------------------- extraction
def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, else None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the box never closed


def extract_answer(text: str | None) -> str | None:
    """The final answer in a response (rules in the module docstring), stripped; None if absent."""
    if not text:
        return None
    pairs = _ANSWER_PAIR.findall(text)
    if pairs:
        boxed = extract_boxed(pairs[-1])
        return (boxed if boxed is not None else pairs[-1]).strip()
    boxed = extract_boxed(text)
    return boxed.strip() if boxed is not None else None


# ----------------------------------------------------------------------------- normalization
def _ascii_digits(s: str) -> str:
    # NFKC folds full-width forms and vulgar fractions ("½" -> "1⁄2" -> "1/2"); Nd catches the other
    # scripts' decimal digits. Superscripts and subscripts are kept as they are: NFKC made "4²" the
    # number 42.
    if s.isascii():
        return s
    s = "".join(c if unicodedata.decomposition(c).startswith(("<super>", "<sub>")) else
                unicodedata.normalize("NFKC", c) for c in s).replace("\u2044", "/")
    return "".join(str(unicodedata.decimal(c)) if c.isdigit() and not c.isascii() and
                   unicodedata.category(c) == "Nd" else c for c in s)


def normalize_answer(s: str) -> str:
    """Canonical text form: ASCII digits, no $ / \\text / thin spaces / thousands commas / final period."""
    s = _ascii_digits(s).strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;| )", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\u2212", "-").strip()  # \$ (MATH's dollars) whole
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.rstrip(".").strip()


_INT = re.compile(r"[+-]?\d+")
# unambiguous: "\d+\.?\d*" could split a run of digits two ways and backtracked quadratically
# ("1" * 20000 + "x": 8 s in the trainer's process)
_DEC = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:[eE]([+-]?\d+))?")
_FRAC = re.compile(r"\(?([+-]?\d+)\)?/\(?([+-]?\d+)\)?")


def _to_number(s: str) -> Fraction | str | None:
    """Exact value of a plain number (int, decimal, a/b), a digit string for huge ints, else None."""
    if _INT.fullmatch(s):
        if len(s) > _MAX_INT_DIGITS:  # int() would refuse; compare canonical digit strings instead
            sign = "-" if s[0] == "-" else ""
            return sign + s.lstrip("+-").lstrip("0")
        return Fraction(int(s))
    m = _DEC.fullmatch(s) if len(s) <= _MAX_INT_DIGITS else None
    if m:
        exp = int(m.group(2) or 0) if len(m.group(2) or "") <= 6 else _MAX_EXPONENT + 1
        if abs(exp) > _MAX_EXPONENT:
            return None  # 1e999999999 would build a billion-digit integer
        return Fraction(m.group(1)) * Fraction(10) ** exp
    m = _FRAC.fullmatch(s)
    if m and len(s) <= 200 and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


# ----------------------------------------------------------------------------- symbolic
_FUNCS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "E", "I", "e"}


_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)
_MAX_SIZE = 4096  # bound on an expression's size (below): 2**4096 has 1234 digits, (x+1)**4096 degree 4096


def _safe_expr(s: str) -> str | None:
    """A Python-syntax expression safe to hand to sympy, or None. Safe: names of one letter or in _FUNCS,
    int and float literals, + - * / and ** with a literal exponent of at most 64, and a bounded size
    (bits of a number, degree in the symbols, multiplied by each power's exponent): nested powers such
    as ((((((9**64)**64)**64)**64)**64)**64)**64, a number of 10**13 bits, hung sympy in C."""
    if len(s) > 200 or re.search(r"\d[eE][+-]?\d", s):  # sympy would expand 1e999999999 exactly
        return None
    s = s.replace("^", "**").replace("\\pi", "pi").replace("\\sqrt", "sqrt").replace("\\cdot", "*")
    s = s.replace("{", "(").replace("}", ")").replace("\\times", "*")
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None

    def size(node) -> int | None:  # None: not allowed
        if isinstance(node, ast.Expression):
            return size(node.body)
        if isinstance(node, ast.Constant):
            if type(node.value) is int and len(repr(node.value)) <= 100:
                return max(node.value.bit_length(), 1)
            return 64 if type(node.value) is float and len(repr(node.value)) <= 100 else None
        if isinstance(node, ast.Name):
            return 1 if len(node.id) == 1 or node.id in _FUNCS else None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, _OPS):
            return size(node.operand)
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS) or node.keywords or not node.args:
                return None
            sizes = [size(a) for a in node.args]
            return None if None in sizes else sum(sizes)
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, _OPS)):
            return None
        a = size(node.left)
        if isinstance(node.op, ast.Pow):
            e = node.right.operand if isinstance(node.right, ast.UnaryOp) else node.right
            if not (isinstance(e, ast.Constant) and type(e.value) is int and abs(e.value) <= 64):
                return None
            return None if a is None else a * max(abs(e.value), 1)
        b = size(node.right)
        if a is None or b is None:
            return None
        return max(a, b) + 1 if isinstance(node.op, (ast.Add, ast.Sub)) else a + b

    try:
        n = size(tree)
    except RecursionError:
        return None
    return s if n is not None and n <= _MAX_SIZE else None


class _Timeout(Exception):
    pass


def _with_timeout(fn, seconds: float):
    """fn() under SIGALRM in the main thread; elsewhere (no signals) fn() runs as is."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        return fn()

    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _symbolic_equal(a: str, b: str, timeout: float) -> bool | None:
    """sympy's verdict on two Python-syntax expressions (False past timeout seconds); None when a side is
    not one (_safe_expr). It runs in reasonrl/rl/verifier.py's worker process, killed at the timeout in
    any thread; where that worker cannot run, here, under SIGALRM on the main thread only."""
    ea, eb = _safe_expr(a), _safe_expr(b)
    if ea is None or eb is None:
        return None
    ea, eb = ea.replace("ln", "log"), eb.replace("ln", "log")
    from reasonrl.rl.verifier import sympy_equal
    r = sympy_equal(ea, eb, timeout)
    if r is not None:
        return r
    import sympy

    def check():
        return bool(sympy.simplify(sympy.sympify(ea) - sympy.sympify(eb)) == 0)

    try:
        return _with_timeout(check, timeout)
    except Exception:  # _Timeout, sympy parse errors, overflow: not verified equal
        return False


def _normalized(pred: str | None, gold) -> tuple[str, str] | None:
    """(pred, gold) through normalize_answer; None for a missing pred, or one far longer than the gold
    (checked before normalization, whose NFKC can grow a string 18x (U+FDFA): no equal answer is that
    much longer than the gold one)."""
    if pred is None:
        return None
    gold = str(gold)
    if len(pred) > 10 * len(gold) + 10_000:
        return None
    return normalize_answer(pred), normalize_answer(gold)


def answers_equal(pred: str | None, gold: str, timeout: float = 1.0) -> bool:
    """Verified equivalence of a predicted and a gold answer (module docstring for the rules)."""
    pair = _normalized(pred, gold)
    if pair is None:
        return False
    p, g = pair
    if not p:
        return False
    if p == g:
        return True
    np_, ng = _to_number(p), _to_number(g)
    if np_ is not None and ng is not None:
        return np_ == ng
    sym = _symbolic_equal(p, g, timeout)
    if sym is not None:
        return sym
    from reasonrl.rl.verifier import math_verify_equal  # LaTeX the checks above cannot read
    return bool(math_verify_equal(p, g, timeout))


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Both plain numbers (an integer, a decimal, a/b, after normalize_answer) of the same exact value; an
    expression ("560*5") is not an answer here, however it evaluates (the "number" checker)."""
    pair = _normalized(pred, gold)
    if pair is None:
        return False
    p, g = map(_to_number, pair)
    return p is not None and g is not None and p == g


# ----------------------------------------------------------------------------- countdown
def countdown_check(expr: str | None, numbers: list[int], target: int) -> bool:
    """True when expr uses exactly `numbers` (each once, all of them), only + - * / and parentheses,
    and evaluates to target. Evaluated on the AST with Fractions: no eval, no floats."""
    if not expr or len(expr) > 200:
        return False
    expr = normalize_answer(expr)
    for sym, op in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\u00d7", "*"), ("\u00f7", "/"),
                    ("\u22c5", "*"), ("x", "*")):
        expr = expr.replace(sym, op)
    expr = expr.split("=")[0]
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    used: list[int] = []
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("disallowed syntax")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return False
    return sorted(used) == sorted(numbers) and value == target


# ----------------------------------------------------------------------------- reward functions
_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def format_reward(response: str, problem=None) -> float:
    """1.0 for exactly <think>...</think><answer>...</answer> (one of each tag, non-empty answer)."""
    response = response or ""
    if any(response.count(t) != 1 for t in _TAGS):  # first: with repeated tags the regex's backtracking is
        return 0.0                                   # quadratic (85 KB of them took 5 s, 340 KB 78 s)
    m = _FORMAT.fullmatch(response)
    return 1.0 if m and m.group("answer").strip() else 0.0


def accuracy_reward(response: str, problem) -> float:
    """1.0 for a verified-correct final answer, per the problem's checker."""
    pred = extract_answer(response)
    checker = getattr(problem, "checker", "math")
    if checker == "none":  # open-ended prompt (tasks.JsonlTask): nothing to verify
        return 0.0
    if checker == "countdown":
        return float(countdown_check(pred, problem.meta["numbers"], problem.meta["target"]))
    if checker == "number":
        return float(numbers_equal(pred, problem.answer))
    if checker == "score":  # e.g. reasoning-gym: the dataset's own scorer in meta
        return float(problem.meta["score"](pred, problem.meta) >= 1.0) if pred is not None else 0.0
    if checker == "code":
        from reasonrl.rl.sandbox import run_tests
        code = _code_block(response)
        return float(code is not None and run_tests(code, problem.meta["tests"],
                                                    plain_returns=problem.meta.get("plain_returns", True) is not False).passed)
    return float(answers_equal(pred, problem.answer))


def _code_block(response: str) -> str | None:
    """The last ```python ...``` block (or the answer text when there is no fenced block)."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", response or "", re.DOTALL)
    return blocks[-1] if blocks else extract_answer(response)


BUILTIN_REWARDS: dict[str, Callable] = {"accuracy": accuracy_reward, "format": format_reward}
RM_PREFIXES = {"rm:": None, "rm_sigmoid:": "sigmoid"}  # reward-model reward names -> squash


class RewardModel:
    """A learned reward: AutoModelForSequenceClassification + AutoTokenizer from a local folder.

    score = the logit of label 0 (the single logit of a 1-label head), sigmoid-squashed when asked.
    The folder is checked when the reward spec is parsed (configs fail early); the weights load on
    the first call and stay cached in _RM_CACHE (one copy per folder however many specs name it).
    `batch` scores a list in chunks of `batch_size` (padded, under no_grad); __call__ scores one."""

    def __init__(self, path: str, squash: str | None = None, batch_size: int = 32, max_length: int = 512):
        if not os.path.isdir(path):
            raise ValueError(f"reward model {path!r}: no such folder (expected a local Hugging Face "
                             "sequence-classification checkpoint: config.json, weights, tokenizer)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"reward model {path!r}: no config.json in the folder")
        self.path, self.squash, self.batch_size, self.max_length = path, squash, batch_size, max_length
        self.__name__ = f"rm:{path}"

    def _load(self):
        key = os.path.realpath(self.path)
        if key not in _RM_CACHE:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.path, local_files_only=True, trust_remote_code=False).eval()
            if tok.pad_token is None:  # batching needs a pad token; eos is the usual stand-in
                tok.pad_token = tok.eos_token or tok.unk_token
            if getattr(model.config, "pad_token_id", None) is None:  # decoder heads find the last token by it
                model.config.pad_token_id = tok.pad_token_id
            tok.padding_side = "right"
            device = "cuda" if torch.cuda.is_available() else "cpu"
            _RM_CACHE[key] = (model.to(device), tok, device)
        return _RM_CACHE[key]

    def batch(self, responses: list[str], problems: list) -> list[float]:
        import torch
        model, tok, device = self._load()
        texts = [f"{getattr(p, 'question', '')}\n{r or ''}" for r, p in zip(responses, problems)]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_length, add_special_tokens=True).to(device)
                logits = model(**enc).logits[:, 0].float()  # (B,) label 0's logit
                if self.squash == "sigmoid":
                    logits = torch.sigmoid(logits)
                out += logits.tolist()
        return out

    def __call__(self, response: str, problem) -> float:
        return self.batch([response], [problem])[0]


_RM_CACHE: dict = {}


def load_reward_fn(spec: str) -> Callable:
    """A reward function by name ("accuracy", "format"), reward model ("rm:FOLDER",
    "rm_sigmoid:FOLDER") or import path "pkg.module:function"."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    for prefix, squash in RM_PREFIXES.items():
        if spec.startswith(prefix):
            return RewardModel(spec[len(prefix):], squash)
    if ":" not in spec:
        raise ValueError(f"reward {spec!r}: expected a built-in name {sorted(BUILTIN_REWARDS)}, "
                         "'rm:FOLDER' or an import path 'pkg.module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name != mod_name.split(".")[0] or os.getcwd() in sys.path:
            raise ValueError(f"reward {spec!r}: cannot import module {mod_name!r}: {e}") from e
        # the `reasonrl` console script, unlike `python -m reasonrl`, has no working directory on
        # sys.path: a reward module beside the run's files was not found
        sys.path.append(os.getcwd())
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e2:
            raise ValueError(f"reward {spec!r}: cannot import module {mod_name!r} (searched sys.path and the "
                             f"working directory): {e2}") from e2
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {mod_name!r}: {e}") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return fn


def parse_reward_spec(spec: str) -> list[tuple[str, Callable, float]]:
    """"accuracy:1.0,format:0.1,pkg.mod:fn:0.5,rm:/models/rm:0.5" -> [(name, fn, weight)]. The
    weight is the part after the last ':' when it parses as a float."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, weight = item, 1.0
        head, _, tail = item.rpartition(":")
        if head:
            try:
                weight, name = float(tail), head
            except ValueError:
                pass
        if not math.isfinite(weight):
            raise ValueError(f"reward {item!r}: weight must be finite")
        out.append((name, load_reward_fn(name), weight))
    if not out:
        raise ValueError(f"rewards {spec!r}: no reward functions given")
    return out


def _checked(name: str, values, n: int) -> list[float]:
    """A reward function's outputs as floats; anything but a finite number raises, naming the reward
    spec and the completion (a NaN reward made every comparison false: dynamic sampling dropped
    its group silently; None or a string crashed deep inside)."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} scores for {n} completions")
    out = []
    for i, x in enumerate(values):
        try:
            v = float(x) if not isinstance(x, (str, bytes)) and x is not None else None
        except Exception:  # TypeError, ValueError, a many-element tensor's RuntimeError, ...
            v = None
        if v is None or not math.isfinite(v):
            raise ValueError(f"reward {name!r} returned {x!r} for completion {i}: a reward must be a finite "
                             "number (int or float)")
        out.append(v)
    return out


def _call(name, fn, i, response, problem):
    try:
        return fn(response, problem)
    except Exception as e:  # a custom reward's bug: name the spec and the completion, keep the cause chained
        raise ValueError(f"reward {name!r} raised {type(e).__name__} for completion {i}: {e}") from e


def compute_rewards(responses: list[str], problems: list, spec: list[tuple[str, Callable, float]]):
    """Weighted sum per response, plus each component's list (for logging). A function with a
    `batch(responses, problems)` method (RewardModel) scores the whole list in one call. Every score
    must be a finite number: otherwise ValueError naming the reward and the completion's index."""
    parts = {name: _checked(name, fn.batch(responses, problems) if hasattr(fn, "batch") else
                            [_call(name, fn, i, r, p) for i, (r, p) in enumerate(zip(responses, problems))],
                            len(responses))
             for name, fn, _ in spec}
    total = [sum(w * parts[name][i] for name, _, w in spec) for i in range(len(responses))]
    return total, parts
