"""Hugging Face checkpoint folders: config.json + safetensors (single file or sharded with an index).

Only safetensors are read: no pickle (pytorch_model.bin), no remote code. Parameter names are
transformers' own, so what we save loads with AutoModelForCausalLM.from_pretrained and back.
Every tensor is checked by name and shape before it is copied; a missing shard, a missing or
unexpected tensor, or a wrong shape raises with the name of the culprit.

MoE experts: our model holds each layer's experts stacked, as transformers 5.x does in memory
(mlp.experts.gate_up_proj (E, 2I, H) = [gate; up], mlp.experts.down_proj (E, H, I)). Files come in
two spellings and both load:
  - per expert, as on the Hub and as transformers 5 writes (it converts back on save):
      Qwen:    mlp.experts.{e}.gate_proj / up_proj / down_proj.weight
      Mixtral: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down).weight, block_sparse_moe.gate.weight
  - fused, as the in-memory names: mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight.
We save the per-expert spelling, which every transformers version loads.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

from .config import ModelConfig
from .model import CausalLM

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Saved by some older checkpoints; recomputed here, never loaded.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# One expert's matrix in a file -> (stacked parameter, which rows): part "gate"/"up" of gate_up_proj, or "down".
_EXPERT = re.compile(r"(?P<pre>model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
                     r"(?P<w>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_HUB_NAME = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
             "qwen": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}


def _target(name: str):
    """A file's tensor name -> (our parameter name, piece) where piece is None (the whole tensor)
    or (expert, part) for one expert's matrix of a stacked parameter."""
    m = _EXPERT.fullmatch(name)
    if m:
        part = _PART[m["w"]]
        stacked = f"{m['pre']}.mlp.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}"
        return stacked, (int(m["e"]), part)
    if ".block_sparse_moe.gate." in name:
        return name.replace(".block_sparse_moe.", ".mlp."), None
    return name, None


def _piece(p: torch.Tensor, piece):
    """The view of stacked parameter p that one expert's matrix fills."""
    if piece is None:
        return p
    e, part = piece
    if e >= p.shape[0]:
        return None
    inter = p.shape[1] // 2
    return {"gate": p[e, :inter], "up": p[e, inter:], "down": p[e]}[part]


def _hub_state_dict(model) -> dict:
    """Our state dict with stacked experts split into the Hub's per-expert tensors."""
    fam = "mixtral" if model.config.arch == "mixtral" else "qwen"
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        stacked = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", k)
        if fam == "mixtral" and re.fullmatch(r"model\.layers\.\d+\.mlp\.gate\.weight", k):
            k = k.replace(".mlp.", ".block_sparse_moe.")
        if not stacked:
            out[k] = v.contiguous()
            continue
        pre = stacked[1] + (".block_sparse_moe" if fam == "mixtral" else ".mlp")
        for e in range(v.shape[0]):
            parts = {"down": v[e]} if stacked[2] == "down_proj" else dict(zip(("gate", "up"), v[e].chunk(2)))
            for part, t in parts.items():
                # clone: safetensors refuses tensors that share storage
                out[f"{pre}.experts.{e}.{_HUB_NAME[fam][part]}.weight"] = t.clone()
    return out


def native_state_dict(model, tensors: dict) -> dict:
    """Tensors as a file names them (the Hub's per-expert MoE tensors, Mixtral's block_sparse_moe) ->
    the names of model.state_dict(), experts stacked. A stacked parameter some expert's piece of which
    is missing (or misshapen) is left out, so that load_state_dict reports it rather than loading
    uninitialized memory; tensors that fit nothing keep their names (reported as unexpected)."""
    params = dict(model.named_parameters())
    out, seen, pieces = {}, set(), set()
    for name, t in tensors.items():
        target, piece = _target(name)
        if piece is None:
            out[target] = t
            continue
        if target not in params:
            out[name] = t
            continue
        if target not in pieces:
            out[target] = torch.empty(params[target].shape, dtype=t.dtype)
            pieces.add(target)
        dst = _piece(out[target], piece)
        if dst is None or tuple(dst.shape) != tuple(t.shape):
            out[name] = t
            continue
        dst.copy_(t)
        seen.add((target, *piece))
    for target in pieces:
        if not _all_pieces(target, out[target], seen):
            del out[target]
    return out


def _weight_files(path: str) -> dict[str, list[str]]:
    """-> {shard file: [tensor names]} (names None for a single file: read them from the file)."""
    single, index = os.path.join(path, SINGLE), os.path.join(path, INDEX)
    if os.path.isfile(single):
        return {single: None}
    if os.path.isfile(index):
        try:
            with open(index) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"load_model: {index} is not valid JSON: {e}") from e
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"load_model: {index} has no weight_map")
        bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"load_model: weight_map in {index} must map tensor names to shard file names, "
                             f"got e.g. {bad[0]!r}")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(os.path.join(path, shard), []).append(name)
        missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"load_model: shard(s) {missing} listed in {INDEX} are missing from {path!r}")
        return shards
    pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles}: pickle checkpoints are not loaded; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"load_model: no {SINGLE} or {INDEX} in {path!r}{hint}")


def load_model(path: str, dtype=torch.float32, device="cpu") -> CausalLM:
    """A CausalLM from a local Hugging Face folder, weights cast to `dtype` on `device`."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_model: path {path!r} is not a directory")
    config = ModelConfig.from_json(path)
    files = _weight_files(path)
    with torch.device("meta"):  # no time or memory spent on an init we overwrite
        model = CausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.reset()
    params = dict(model.named_parameters())
    seen = set()  # parameter names, or (name, expert, part) for one expert's piece of a stacked one
    for file, names in files.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                held = set(f.keys())
                lost = [n for n in names if n not in held] if names is not None else []
                if lost:
                    raise ValueError(f"load_model: the index ({INDEX}) puts {lost[0]!r} in {os.path.basename(file)}, "
                                     f"which does not hold it" + (f" ({len(lost)} such tensors)" if len(lost) > 1 else ""))
                for name in names if names is not None else f.keys():
                    if _IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    target, piece = _target(name)
                    dst = _piece(params[target], piece) if target in params else None
                    if dst is None:
                        raise ValueError(f"load_model: unexpected tensor {name!r} in {os.path.basename(file)} for "
                                         f"a {config.arch} model (a different architecture or option?)")
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(dst.shape):
                        raise ValueError(f"load_model: tensor {name!r} in {os.path.basename(file)} has shape "
                                         f"{tuple(t.shape)}, expected {tuple(dst.shape)} from config.json")
                    with torch.no_grad():
                        dst.copy_(t)
                    seen.add(target if piece is None else (target, *piece))
        except SafetensorError as e:  # a truncated or corrupt file: name it
            raise ValueError(f"load_model: cannot read {file} (truncated or not a safetensors file?): {e}") from e
    missing = sorted(n for n in params if n not in seen and not _all_pieces(n, params[n], seen))
    if missing:
        raise ValueError(f"load_model: {len(missing)} tensor(s) missing from {path!r}, e.g. {missing[:3]}")
    return model


def _all_pieces(name: str, p: torch.Tensor, seen: set) -> bool:
    """Whether a stacked expert parameter was filled one expert at a time, every piece of it."""
    if name.endswith(".experts.gate_up_proj"):
        return all((name, e, part) in seen for e in range(p.shape[0]) for part in ("gate", "up"))
    if name.endswith(".experts.down_proj"):
        return all((name, e, "down") in seen for e in range(p.shape[0]))
    return False


def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(s), re.I)
    if not m:
        raise ValueError(f"save_model: max_shard_size {s!r} is not a size like 500MB or 2GB or an int")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _shards(tensors: dict, limit: int | None) -> list[dict]:
    if limit is None:
        return [tensors]
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + nbytes
    return shards + [cur]


def save_model(model: CausalLM, path: str, max_shard_size=None, tokenizer=None) -> None:
    """Writes config.json and model.safetensors (or model-0000i-of-0000n.safetensors + index), and the
    tokenizer's files when given.

    max_shard_size: bytes (int) or a string like "2GB"; None writes one file.
    Atomic: the whole folder is written beside `path` (PATH.tmp-<pid>) and renamed into place, so a
    crash leaves the old model or the new one, never a mix (writing file by file over an earlier save
    could leave its index or config with the new weights: a load that mixed two models silently).
    An existing folder's other files (a README, generation_config.json; not its weight files) are
    carried over. A crash between the two renames of the swap leaves PATH.old-<pid> and no PATH.
    """
    from safetensors.torch import save_file

    for wrapper in ("_orig_mod", "module"):  # torch.compile, DDP: save the model inside
        model = getattr(model, wrapper, model)
    if not isinstance(model, CausalLM):
        raise TypeError(f"save_model: model must be a reasonrl CausalLM, got {type(model).__name__}")
    final = os.path.abspath(path)
    if final == os.getcwd() or final == os.path.dirname(final):
        raise ValueError(f"save_model: {path!r} is the working directory or a root; save into a folder below it")
    if os.path.exists(final) and not os.path.isdir(final):
        raise ValueError(f"save_model: {path!r} exists and is not a folder")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if model.config.is_moe:
            tensors = _hub_state_dict(model)
        else:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        shards = _shards(tensors, None if max_shard_size is None else _parse_size(max_shard_size))
        n = len(shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, name), 0o666 & ~_umask())  # safetensors creates 0600 files
        if n > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: names[i] for i, s in enumerate(shards) for k in s}}
            _write_json(os.path.join(tmp, INDEX), index)
        d = model.config.to_hf_dict()
        dt = str(next(model.parameters()).dtype).replace("torch.", "")
        d.update(dtype=dt, torch_dtype=dt)
        _write_json(os.path.join(tmp, "config.json"), d)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?(\.tmp)?")


def _swap_in(new: str, path: str) -> None:
    """Rename the complete folder `new` to `path`; an existing `path`'s files other than weights and
    what `new` holds move into it, the rest is removed."""
    if not os.path.exists(path):
        os.replace(new, path)
        return
    old = f"{path}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(new, path)  # the commit point: `path` is the new model, whole
    written = set(os.listdir(path))
    for name in os.listdir(old):
        if name not in written and not _WEIGHT_FILE.fullmatch(name):
            os.replace(os.path.join(old, name), os.path.join(path, name))
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(file: str, obj) -> None:
    with open(file + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(file + ".tmp", file)
