"""Checkpoints: model weights (a Hugging Face folder: config.json + model.safetensors), optimizer
state (safetensors tensors + JSON structure), and a JSON state (step, RNG states, config, ...).

Atomic: a checkpoint is written into a temporary folder next to its final place, every file and
the folder fsync'ed, then renamed with os.replace; a `latest` file naming the newest checkpoint is
replaced the same way. A crash at any moment leaves either the old or the new checkpoint, never
half of one. No pickle anywhere: loading a checkpoint runs no code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from reasonrl.models import save_model
from reasonrl.models.checkpoint import native_state_dict

LATEST = "latest"


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


def rng_state() -> dict:
    """Python, NumPy and torch (CPU, CUDA) RNG states as JSON-able values."""
    py = random.getstate()
    np_state = np.random.get_state()
    st = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
          "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CPU run never wakes the GPUs
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():  # as many devices as both machines have
        for i, s in enumerate(st["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """optimizer.state_dict() split into flat tensors ("state.<param>.<key>") and a JSON rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _read_tensors(file: str) -> dict:
    """load_file, its errors (a truncated or corrupt file) naming the file."""
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint file {file!r} is missing")
    try:
        return load_file(file)
    except Exception as e:  # safetensors' SafetensorError, OSError, ...
        raise ValueError(f"checkpoint file {file!r} is corrupt or truncated ({type(e).__name__}: {e})") from None



def write_text_atomic(path: str, text: str) -> None:
    """`text` to `path` through a temporary file renamed into place (fsynced first): a reader, or a
    crash, sees the old file or the new one. The one writer of the run's JSON, JSONL and markdown
    outputs (pipeline markers and results, sampled data, evaluations)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def _read_json(file: str):
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint file {file!r} is missing")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"checkpoint file {file!r} is corrupt (not valid JSON: {e})") from None


def _load_optimizer(optimizer, folder):
    file = os.path.join(folder, "optimizer.safetensors")
    tensors = _read_tensors(file)
    rest_file = os.path.join(folder, "optimizer.json")
    rest = _read_json(rest_file)
    try:
        state: dict = {}
        for name, t in tensors.items():
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = t
        for name, v in rest["scalars"].items():
            pid, k = name.split(".", 1)
            state.setdefault(int(pid), {})[k] = v
        # this run's hyperparameters (weight decay, betas, eps, ...) over the saved ones: a changed field was
        # warned about on resume and then silently replaced by the saved value (and the next checkpoint
        # labelled with the new one). lr is the schedule's, set before every step.
        mine = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
        optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
        for g, m in zip(optimizer.param_groups, mine):
            g.update(m)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"checkpoint {folder!r}: optimizer state ({file}, {rest_file}) does not fit this run's "
                         f"optimizer ({type(e).__name__}: {e})") from None


_HELD = {"depth": 0, "count": 0, "old": {}, "first": None}


@contextlib.contextmanager
def hold_signals(what: str):
    """Ctrl-C (SIGINT) and SIGTERM wait while a checkpoint or a final model is written: the first one is
    noted (one line) and handed to the handler that was there before once the block is done (a
    StepGuard's: the step finishes and the loop stops; Python's: KeyboardInterrupt); a third abandons
    the block at once (the write is atomic: the previous checkpoint stays). Before, a Ctrl-C during the end-of-stage
    save, or a second one during the save the first had started, lost every step since the last
    checkpoint without a word. Nested blocks hold as one (the outermost raises). Main thread only."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _HELD["depth"] == 0:
        _HELD["count"] = 0

        def handler(signum, frame):
            _HELD["count"] += 1
            if _HELD["count"] == 1:
                _HELD["first"] = signum
                print(f"\n[{what}] interrupt: finishing the write in progress, then stopping (interrupt twice "
                      "more to abandon it: the last complete checkpoint stays)", flush=True)
            elif _HELD["count"] >= 3:
                print(f"\n[{what}] write abandoned", flush=True)
                raise KeyboardInterrupt
        _HELD["old"] = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _HELD["depth"] += 1
    done, old = False, _HELD["old"]
    try:
        yield
        done = True
    finally:
        _HELD["depth"] -= 1
        if _HELD["depth"] == 0:
            for sig, h in old.items():
                signal.signal(sig, h)
            _HELD["old"] = {}
    if done and _HELD["depth"] == 0 and _HELD["count"]:
        _HELD["count"], sig = 0, _HELD["first"]
        h = old.get(sig)
        if callable(h):
            h(sig, None)
        elif h != signal.SIG_IGN:  # SIG_DFL (SIGTERM with no handler): stop as Ctrl-C does
            raise KeyboardInterrupt


def save_checkpoint(run_dir: str, model, optimizer, state: dict, tokenizer=None, keep: int = 2) -> str:
    """Write run_dir/step-<step> atomically and point run_dir/latest at it; returns its path.
    The `keep` newest step checkpoints stay (0: all). A step already saved completely is not written
    again (the periodic save and the end-of-stage save of the same step, a resumed finished stage): its
    state is the same, and replacing it would leave `latest` naming a missing folder for a moment."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"checkpoint folder {run_dir!r} cannot be created: {e}") from e
    name = f"step-{int(state['step']):07d}"
    with hold_signals(f"checkpoint {name}"):
        return _write_checkpoint(run_dir, name, model, optimizer, state, tokenizer, keep)


def _write_checkpoint(run_dir, name, model, optimizer, state, tokenizer, keep) -> str:
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")
    _remove_stale_tmp(run_dir)
    if not os.path.isfile(os.path.join(final, "state.json")):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tmp, tokenizer=tokenizer)
            if optimizer is not None:
                tensors, rest = _optimizer_tensors(optimizer)
                save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
                with open(os.path.join(tmp, "optimizer.json"), "w") as f:
                    json.dump(rest, f)
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({**state, "rng": rng_state()}, f)
            _fsync_tree(tmp)
        except Exception as e:  # disk full, permissions: name the checkpoint, leave no partial folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"writing checkpoint {final!r} failed: {e}") from e
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder of that name (no state.json)
        os.replace(tmp, final)
    pointer = os.path.join(run_dir, f".{LATEST}.tmp")
    with open(pointer, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(run_dir, LATEST))
    _fsync_dir(run_dir)
    olds = sorted(d for d in os.listdir(run_dir) if d.startswith("step-") and d != name)
    for d in (olds[:max(0, len(olds) - (keep - 1))] if keep > 0 else []):
        shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    return final


class StepGuard:
    """Ctrl-C (SIGINT) or SIGTERM during a stage's loop: the step in flight finishes, the loop saves it
    and stops (`stop_requested`, checked between steps), so a checkpoint never holds a half-done step.
    A second signal stops at once. A KeyboardInterrupt that lands inside a step (the second signal, or
    no handler: not the main thread) saves only if the optimizer has not stepped yet in that step
    (`clean`): otherwise the checkpoint would label the next step's weights with this step's number
    and a resumed run would train that step twice.
        with StepGuard(tag, opt) as guard:
            while ...: ...one step...; guard.step_done(); if guard.stop_requested: break"""

    def __init__(self, tag: str, optimizer):
        self.tag, self.stop_requested, self.clean = tag, False, True
        self._hook = optimizer.register_step_pre_hook(self._stepping)
        self._old = {}

    def _stepping(self, *args):
        self.clean = False

    def step_done(self):
        self.clean = True

    def _signal(self, signum, frame):
        if self.stop_requested:
            print(f"\n[{self.tag}] second interrupt: stopping now", flush=True)
            raise KeyboardInterrupt
        self.stop_requested = True
        print(f"\n[{self.tag}] interrupt: finishing this step, then saving (interrupt again to stop at once)",
              flush=True)

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._signal)
        return self

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._hook.remove()
        return False


def on_interrupt(tag: str, guard: StepGuard, save, run_dir: str, step: int | None = None) -> None:
    """A stage's KeyboardInterrupt handler: save where the step is clean, else say what resume will use."""
    def last():
        try:
            return latest_checkpoint(run_dir) or "the beginning"
        except (OSError, ValueError):
            return "the beginning"
    if guard.clean:
        try:
            path = save()
        except KeyboardInterrupt:  # more interrupts during the save: hold_signals finished it or abandoned it
            print(f"[{tag}] interrupted while saving; --resume starts from {last()}", flush=True)
            return
        print(f"[{tag}] interrupted: saved {path}", flush=True)
        return
    where = last()
    if step is not None and os.path.basename(str(where)) == f"step-{int(step):07d}":  # an interrupt held during
        print(f"[{tag}] interrupted: saved {where} (the step's periodic save)", flush=True)  # that save
        return
    print(f"[{tag}] interrupted inside a step after its optimizer update: not saved (a checkpoint would "
          f"mislabel that step); --resume starts from {where}", flush=True)


def on_nonfinite(tag: str, guard: StepGuard, save, run_dir: str, step: int, err: Exception) -> FloatingPointError:
    """A stage's FloatingPointError handler (a non-finite gradient norm: the run diverged): save where the
    step is clean (the weights before it), so a resume with a lower learning rate starts there, and
    return the error to raise, naming the step and the checkpoint."""
    if guard.clean:
        where = f"saved {save()} (the weights before this step)"
    else:
        try:
            ckpt = latest_checkpoint(run_dir)
        except (OSError, ValueError):
            ckpt = None
        where = f"not saved (an update of this step ran); --resume starts from {ckpt or 'the beginning'}"
    return FloatingPointError(f"[{tag}] step {step + 1}: {err}; {where}. Lower the learning rate (or check "
                              "the rewards and beta) and --resume")


def _remove_stale_tmp(run_dir: str) -> None:
    """Temporary checkpoint folders of processes that died while writing them (SIGKILL, power loss)."""
    for d in os.listdir(run_dir):
        if not d.startswith(".tmp-step-"):
            continue
        try:
            pid = int(d.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)  # alive (maybe another run writing here): leave it
        except ProcessLookupError:
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
        except OSError:
            pass


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint `latest` names; if that one is missing or incomplete (a crash mid-rewrite), or
    `latest` itself is missing (a crash between the first checkpoint's rename and the pointer's write),
    the newest complete step-* folder, with a warning; None when there is none."""
    pointer = os.path.join(run_dir, LATEST)
    complete = sorted(d for d in os.listdir(run_dir)
                      if d.startswith("step-") and os.path.isfile(os.path.join(run_dir, d, "state.json"))
                      ) if os.path.isdir(run_dir) else []
    if not os.path.isfile(pointer):
        if not complete:
            return None
        found = os.path.join(run_dir, complete[-1])
        print(f"warning: {run_dir!r} has no {LATEST!r} pointer but holds complete checkpoints; using {found!r}")
        return found
    with open(pointer) as f:
        path = os.path.join(run_dir, f.read().strip())
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    if not complete:
        raise FileNotFoundError(f"checkpoint {path!r} named by {pointer!r} is incomplete or missing, and "
                                f"{run_dir!r} holds no other complete checkpoint")
    found = os.path.join(run_dir, complete[-1])
    print(f"warning: checkpoint {path!r} named by {pointer!r} is incomplete or missing; using {found!r}")
    return found


def read_state(path: str) -> dict:
    """A checkpoint's state.json (step, elapsed, stage, config, rng), checked; errors name the file."""
    file = os.path.join(path, "state.json")
    state = _read_json(file)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint file {file!r} is corrupt (expected a JSON object, got {type(state).__name__})")
    missing = [k for k in ("step", "rng") if k not in state]
    if missing:
        raise ValueError(f"checkpoint file {file!r} is corrupt (no {', '.join(map(repr, missing))})")
    step, elapsed = state["step"], state.get("elapsed", 0.0)
    if type(step) is not int or step < 0 or type(elapsed) not in (int, float) or not elapsed >= 0:
        raise ValueError(f"checkpoint file {file!r} is corrupt (step {step!r}, elapsed {elapsed!r}: expected an "
                         "integer >= 0 and a number >= 0)")
    return state


def load_checkpoint(path: str, model, optimizer=None) -> dict:
    """Load weights (and optimizer state) into existing objects; returns the JSON state, RNGs restored.
    A missing, truncated or corrupt file raises ValueError naming it."""
    state = read_state(path)  # first: a bad state.json must not leave half-loaded weights behind
    file = os.path.join(path, "model.safetensors")
    weights = native_state_dict(model, _read_tensors(file))  # MoE experts: saved per expert, as the Hub has them
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches: another model's checkpoint
        raise ValueError(f"load_checkpoint {file!r}: the weights do not fit this model "
                         f"({str(e).strip().splitlines()[-1].strip()})") from None
    missing = [m for m in missing if not (m == "lm_head.weight" and model.lm_head is None)]
    if missing or unexpected:
        raise ValueError(f"load_checkpoint {path!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if optimizer is not None:
        _load_optimizer(optimizer, path)
    try:
        set_rng_state(state.pop("rng"))
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise ValueError(f"checkpoint file {os.path.join(path, 'state.json')!r} is corrupt "
                         f"(bad RNG state: {type(e).__name__}: {e})") from None
    return state


_KIND_FIELDS = {"GRPO": "group_size", "SFT": "num_examples"}  # a field only that config has


def _stage_kind(state: dict) -> str | None:
    """'SFT' or 'GRPO': which trainer wrote a checkpoint, from its recorded config (the stage tag
    alone may be a custom name: control, rs_sft, mt_grpo, ...); None when it cannot tell."""
    config = state.get("config")
    if isinstance(config, dict):
        for kind, key in _KIND_FIELDS.items():
            if key in config:
                return kind
    stage = str(state.get("stage", ""))
    return "GRPO" if "grpo" in stage else "SFT" if "sft" in stage else None


def check_stage(path: str, state: dict, cfg, tag: str) -> None:
    """Refuse to resume a checkpoint written by the other trainer (`reasonrl sft --resume` on a GRPO
    run's folder resumed the GRPO weights, optimizer and step count as SFT)."""
    kind = "GRPO" if hasattr(cfg, "group_size") else "SFT"
    theirs = _stage_kind(state)
    if theirs is not None and theirs != kind:
        raise ValueError(f"--resume: the checkpoint {path!r} was written by stage {state.get('stage', '?')!r} "
                         f"({theirs}), but this is stage {tag!r} ({kind}); point {type(cfg).__name__}.out_dir "
                         "at a new folder, or drop --resume")


def resume_or_start(cfg, model, opt, tag):
    """(step, elapsed, logger) of a stage: from its latest checkpoint under --resume, else fresh.
    The checkpoint must come from the same kind of stage (SFT or GRPO: check_stage)."""
    from reasonrl.train.logger import MetricsLogger

    step, elapsed = 0, 0.0
    resume_from = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"[{tag}] --resume: no checkpoint in {cfg.out_dir}; starting fresh")
    if resume_from:
        saved = read_state(resume_from)
        check_stage(resume_from, saved, cfg, tag)
        changed = config_changes(saved.get("config"), cfg)
        if changed:
            print(f"[{tag}] warning: resuming {resume_from} with settings that differ from its run's: "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed)
                  + " (the run goes on with this invocation's values: to keep the run's own, repeat its flags or "
                  "its --config TOML)")
        state = load_checkpoint(resume_from, model, opt)
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        print(f"[{tag}] resumed from {resume_from} at step {step}")
    else:
        set_aside_previous_run(cfg.out_dir, tag)
    return step, elapsed, MetricsLogger(cfg.out_dir, resume_step=step if resume_from else None)


# Fields that may change when a run is resumed without changing what it trains on or how.
_RESUME_FREE = {"resume", "steps", "max_seconds", "save_every", "log_every", "keep_checkpoints", "out_dir",
                "threads", "device"}


def config_changes(saved, cfg) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for each setting a resumed run changes, other than the ones
    a resume may change freely (_RESUME_FREE): the resumed metrics no longer match an uninterrupted run."""
    if not isinstance(saved, dict):
        return []
    now = dataclasses.asdict(cfg)
    return [(k, saved[k], v) for k, v in now.items()
            if k in saved and k not in _RESUME_FREE and saved[k] != v
            and not (isinstance(v, tuple) and list(v) == saved[k])]  # JSON keeps tuples as lists


_RUN_FILES = ("latest", "final", "metrics.jsonl", "metrics.png")


def set_aside_previous_run(run_dir: str, tag: str, hint: str = "pass --resume to continue a run") -> str | None:
    """A fresh (not resumed) stage whose folder holds an earlier run's checkpoints: move them, with that
    run's metrics and final weights, into run_dir/previous-<time>/ (nothing is deleted), so that a later
    --resume cannot pick up the earlier run's step-N, and `latest` never names a step this run did not
    write. -> the folder they went to, or None when there was nothing."""
    if not os.path.isdir(run_dir):
        return None
    names = [d for d in os.listdir(run_dir) if d.startswith("step-") or d.startswith(".tmp-step-") or d in _RUN_FILES]
    if not any(d.startswith("step-") or d in ("latest", "final") for d in names):
        return None
    dest = os.path.join(run_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(run_dir, time.strftime("previous-%Y%m%d-%H%M%S") + f"-{n}")
    os.makedirs(dest)
    for d in names:
        os.replace(os.path.join(run_dir, d), os.path.join(dest, d))
    _fsync_dir(run_dir)
    print(f"[{tag}] {run_dir} held an earlier run's checkpoints: moved to {dest} ({hint})")
    return dest
