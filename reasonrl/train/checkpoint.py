"""Checkpoints: model weights (a Hugging Face folder: config.json + model.safetensors), optimizer
state (safetensors tensors + JSON structure), and a JSON state (step, RNG states, config, ...).

Atomic: a checkpoint is written into a temporary folder next to its final place, every file and
the folder fsync'ed, then renamed with os.replace; a `latest` file naming the newest checkpoint is
replaced the same way. A crash at any moment leaves either the old or the new checkpoint, never
half of one. No pickle anywhere: loading a checkpoint runs no code.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from reasonrl.models import save_model

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
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


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


def _load_optimizer(optimizer, folder):
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "optimizer.json")) as f:
        rest = json.load(f)
    state: dict = {}
    for name, t in tensors.items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid), {})[k] = t
    for name, v in rest["scalars"].items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_checkpoint(run_dir: str, model, optimizer, state: dict, tokenizer=None, keep: int = 2) -> str:
    """Write run_dir/step-<step> atomically and point run_dir/latest at it; returns its path.
    The `keep` newest step checkpoints stay (0: all)."""
    os.makedirs(run_dir, exist_ok=True)
    name = f"step-{int(state['step']):07d}"
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, f".tmp-{name}-{os.getpid()}")
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
    if os.path.exists(final):
        shutil.rmtree(final)
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


def latest_checkpoint(run_dir: str) -> str | None:
    pointer = os.path.join(run_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, f.read().strip())
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise FileNotFoundError(f"checkpoint {path!r} named by {pointer!r} is incomplete or missing")
    return path


def load_checkpoint(path: str, model, optimizer=None) -> dict:
    """Load weights (and optimizer state) into existing objects; returns the JSON state, RNGs restored."""
    weights = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.lm_head is None)]
    if missing or unexpected:
        raise ValueError(f"load_checkpoint {path!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if optimizer is not None:
        _load_optimizer(optimizer, path)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    set_rng_state(state.pop("rng"))
    return state


def resume_or_start(cfg, model, opt, tag):
    """(step, elapsed, logger) of a stage: from its latest checkpoint under --resume, else fresh."""
    from reasonrl.train.logger import MetricsLogger

    step, elapsed = 0, 0.0
    resume_from = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"[{tag}] --resume: no checkpoint in {cfg.out_dir}; starting fresh")
    if resume_from:
        state = load_checkpoint(resume_from, model, opt)
        step, elapsed = state["step"], state["elapsed"]
        print(f"[{tag}] resumed from {resume_from} at step {step}")
    return step, elapsed, MetricsLogger(cfg.out_dir, resume_step=step if resume_from else None)
