"""generate(): prompts in, completions (token ids, log-probs, finish reason) out.

One call owns a KV cache for its duration and frees it at the end (training needs that memory
back). It runs on the model's own parameters: no copy, no weight sync. Opt-in, LLMEngine(dtype=
torch.bfloat16) runs each call on a bf16 cast of the parameters made at its start and dropped at its
end (2 bytes per parameter while it runs): with float32 master weights, decode then reads half the
bytes (GPU) or runs bf16 matmuls (CPUs with AVX512-BF16 / AMX: 2.1x the rollout of SmolLM2-135M on 2
cores here). The samples then come from the bf16-rounded policy; trainers score them with their own
forward, so the loss is unchanged, the sampling distribution slightly.

Decode windows: without thinking control or stop strings, one schedule runs up to decode_window
decode steps from device tensors (_decode_window) and goes back to the Python sequences only when a
stop token appears or the window ends; the outputs are those of one step per schedule
(tests/test_engine.py: test_decode_window_equals_single_steps). decode_window=1 turns it off.

Thinking control (needs the tokenizer, for the ids of "<think>", "</think>" and the continuation):
- think_budget: once that many tokens were generated inside <think>...</think>, "</think>" is
  forced (its tokens are emitted instead of sampled) and the answer follows.
- think_extend: when the model itself emits "</think>" and fewer than think_extend extensions
  were used, that "</think>" is taken back (the sequence is truncated, its k/v get rewritten) and
  think_extend_text is forced instead (s1's budget forcing). Forced tokens count as generated
  tokens (max_tokens) and, inside thinking, as thinking tokens (think_budget).
- A prompt that leaves <think> open (opens_think: its last "<think>" after its last "</think>", as
  in templates ending "<think>\n") starts its completion inside thinking; the budget counts the
  completion's tokens.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch

from reasonrl.engine.block_manager import BlockManager
from reasonrl.engine.decode_forward import pack_for_decode
from reasonrl.engine.runner import Runner, kv_bytes_per_block
from reasonrl.engine.sampler import Sampler
from reasonrl.engine.scheduler import Scheduler
from reasonrl.engine.sequence import (Completion, SamplingParams, Sequence, common_prefix_len, is_int, max_context,
                                      prompt_token_ids)

CPU_KV_DEFAULT_BYTES = 2 << 30


def _ends_with(ids: list[int], tail: list[int]) -> bool:
    return bool(tail) and len(ids) >= len(tail) and ids[-len(tail):] == tail


def _last_index(ids: list[int], tag: list[int]) -> int:
    n = len(tag)
    for i in range(len(ids) - n, -1, -1):
        if ids[i:i + n] == tag:
            return i
    return -1


def check_logprobs(seqs, logprobs) -> None:
    """logprobs: per sequence, the host-side log-probs of the tokens just drawn for it. NaN means the
    model's logits were NaN, or had no finite value, at that step (a diverged model, broken weights):
    raise, naming the sequence, rather than go on with tokens drawn from garbage. FloatingPointError,
    which the trainer handles as a diverged run (it saves, then stops with one line)."""
    for s, row in zip(seqs, logprobs):
        for j, v in enumerate(row):
            if v != v:
                raise FloatingPointError(
                    f"generate: the model's next-token distribution is NaN (NaN logits, or no finite logit) for "
                    f"prompt {s.request_index} sample {s.sample_index} at completion token "
                    f"{len(s.completion_ids) + j}: the model has diverged or its weights are broken")


def opens_think(prompt: list[int], start: list[int], end: list[int]) -> bool:
    """Whether a prompt leaves a <think> span open: its last start tag comes after its last end tag. So
    templates that end "<think>\n" (R1's) or prefill "<think>Let me" count, not only a final "<think>"."""
    i = _last_index(prompt, start) if start else -1
    return i >= 0 and _last_index(prompt[i:], end) < 0


class LLMEngine:
    def __init__(self, model, *, tokenizer=None, block_size=16, kv_cache_bytes=None, max_num_seqs=256,
                 max_num_batched_tokens=4096, eos_token_ids=None, use_cuda_graphs=True, prefix_sharing=True,
                 decode_window=16, dtype=None):
        for name, v in (("block_size", block_size), ("decode_window", decode_window), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            if not is_int(v):
                raise TypeError(f"LLMEngine: {name} must be an int, got {v!r} ({type(v).__name__})")
        if block_size < 1:
            raise ValueError(f"LLMEngine: block_size must be >= 1, got {block_size}")
        if decode_window < 1:
            raise ValueError(f"LLMEngine: decode_window must be >= 1, got {decode_window}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"LLMEngine: max_num_seqs and max_num_batched_tokens must be >= 1, "
                             f"got {max_num_seqs}, {max_num_batched_tokens}")
        if kv_cache_bytes is not None and (not is_int(kv_cache_bytes) or kv_cache_bytes < 1):
            raise ValueError(f"LLMEngine: kv_cache_bytes must be a positive int (bytes) or None (automatic), "
                             f"got {kv_cache_bytes!r}")
        eos_list = eos_token_ids if isinstance(eos_token_ids, (list, tuple, set, frozenset)) else [eos_token_ids]
        if eos_token_ids is not None and not all(is_int(e) and e >= 0 for e in eos_list):
            raise ValueError(f"LLMEngine: eos_token_ids must be None, a token id or a list of token ids (ints >= 0), "
                             f"got {eos_token_ids!r}")
        self.model, self.tokenizer = model, tokenizer
        self.block_size, self.kv_cache_bytes = block_size, kv_cache_bytes
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.use_cuda_graphs, self.prefix_sharing = use_cuda_graphs, prefix_sharing
        self.decode_window = decode_window
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"LLMEngine: dtype must be None (the parameters as they are), torch.float32, "
                             f"torch.bfloat16 or torch.float16, got {dtype}")
        self.dtype = dtype
        self.eos_token_ids = self._default_eos(eos_token_ids)
        self.sampler = Sampler()
        self.stats: dict = {}
        self.lagged_stop_check: bool | None = None  # None: on CUDA only (_lagged_stop_check)
        self.stats_discarded_steps = 0

    def _default_eos(self, eos):
        """The ids given, else the union of the tokenizer's EOS and the model config's (one id or a list:
        instruct models such as Llama 3 end turns with a token the other one does not name)."""
        srcs = [eos] if eos is not None else [getattr(self.tokenizer, "eos_token_id", None),
                                              getattr(self.model.config, "eos_token_id", None)]
        return {int(e) for x in srcs if x is not None for e in (x if isinstance(x, (list, tuple, set)) else [x])}

    # -- API ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, n: int = 1,
                 use_tqdm: bool = False) -> list[list[Completion]]:
        params = SamplingParams() if params is None else params
        groups = self._make_sequences(prompts, params, n)
        dev = next(self.model.parameters()).device
        # CUDA graphs, Triton launches and syncs act on the current device: make it the model's
        on_dev = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), on_dev:
            self._run([s for g in groups for s in g], groups, use_tqdm)
        return [[self._completion(s) for s in g] for g in groups]

    def generate_text(self, prompts: list[str], params: SamplingParams | None = None, n: int = 1):
        if isinstance(prompts, str):
            raise TypeError("generate_text: prompts must be a list of str; got one str (it would be one prompt "
                            "per character): pass [text]")
        if self.tokenizer is None:
            raise ValueError("generate_text: the engine has no tokenizer (LLMEngine(model, tokenizer=...))")
        return self.generate([self.tokenizer.encode(p) for p in prompts], params, n)

    # -- set-up ------------------------------------------------------------------------------
    def _make_sequences(self, prompts, params, n):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params must be a SamplingParams (or None), got {type(params).__name__}")
        params.__post_init__()  # checked again: a field set after construction (sp.temperature = nan) skipped it
        if not is_int(n):
            raise TypeError(f"generate: n (samples per prompt) must be an int, got {n!r} ({type(n).__name__})")
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
            raise TypeError("generate: prompts are lists of token ids, got text; generate_text(prompts) takes strings")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("generate: prompts must be a non-empty list of token-id lists")
        cfg = self.model.config
        V, max_len = cfg.vocab_size, max_context(cfg)
        scaling = getattr(cfg, "rope_scaling", None) or {}
        _dynamic_note = f" x dynamic rope factor {scaling['factor']}" if scaling.get("rope_type") == "dynamic" else ""
        groups = []
        for i, p in enumerate(prompts):
            p = prompt_token_ids(p, i)
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"generate: prompt {i} has token ids outside [0, {V})")
            if max_len is not None and len(p) + params.max_tokens > max_len:
                raise ValueError(
                    f"generate: prompt {i} has {len(p)} tokens and max_tokens is {params.max_tokens}: "
                    f"{len(p) + params.max_tokens} tokens exceed the model's context (max_position_embeddings="
                    f"{cfg.max_position_embeddings}{_dynamic_note}); shorten the prompt or lower max_tokens")
            groups.append([Sequence(p, params, sample_index=j, request_index=i) for j in range(n)])
        return groups

    def _think_ids(self, params: SamplingParams):
        if params.think_budget is None and params.think_extend == 0:
            return None
        if self.tokenizer is None:
            raise ValueError("generate: think_budget / think_extend need the engine's tokenizer (for the tag ids)")
        enc = lambda s: self.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        ids = {"start": enc("<think>"), "end": enc("</think>"), "extend": enc(params.think_extend_text)}
        if not ids["start"] or not ids["end"] or (params.think_extend and not ids["extend"]):
            raise ValueError(f"generate: the tokenizer gives no ids for the thinking tags/text: {ids}")
        return ids

    def _rollout_model(self):
        """self.model, or (dtype set and different) a copy whose parameters are cast to dtype. Buffers
        (RoPE tables) are copied as they are. The copy lives for one generate() call."""
        p = next(self.model.parameters())
        if self.dtype is None or p.dtype == self.dtype:
            return self.model
        # made outside inference mode (generate() runs in it): inference tensors as parameters could
        # not be stored back to back by pack_for_decode (their .data cannot be rebound)
        with torch.inference_mode(False):
            memo = {id(q): torch.nn.Parameter(q.detach().to(self.dtype), requires_grad=False)
                    for q in self.model.parameters()}
            return copy.deepcopy(self.model, memo).eval()

    def _num_blocks(self, seqs, max_len_blocks, model):
        bpb = kv_bytes_per_block(model, self.block_size, next(model.parameters()).dtype)
        need = sum((s.num_prompt_tokens + s.params.max_tokens + self.block_size - 1) // self.block_size for s in seqs)
        if self.kv_cache_bytes is not None:
            return max(1, int(self.kv_cache_bytes) // bpb)
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch
            cap = int(0.8 * free) // bpb
        else:
            cap = CPU_KV_DEFAULT_BYTES // bpb
        return max(min(need, cap), max_len_blocks)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self, seqs, groups, use_tqdm):
        params = seqs[0].params
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("generate: stop_strings need the engine's tokenizer (LLMEngine(model, tokenizer=...))")
        self.think_ids = self._think_ids(params)
        self._setup_window(params, seqs[0].params is params and all(x.params is params for x in seqs))
        max_len = max(s.num_prompt_tokens + s.params.max_tokens for s in seqs)
        max_blocks = (max_len + self.block_size - 1) // self.block_size
        model = self._rollout_model()
        pack_for_decode(model)  # q/k/v and gate/up back to back for the GPU decode step, before KV sizing
        bm = BlockManager(self._num_blocks(seqs, max_blocks, model), self.block_size)
        sched = Scheduler(bm, self.max_num_seqs, self.max_num_batched_tokens)
        for g in groups:
            for s in g:
                sched.check_fits(s, s.num_prompt_tokens + s.params.max_tokens)
                self._enter_think_from_prompt(s)
            chunk = self.max_num_seqs if self.prefix_sharing else 1  # a group larger than a batch shares in chunks
            for i in range(0, len(g), chunk):
                leader, *followers = g[i: i + chunk]
                leader.followers = followers
                sched.add(leader)
        runner = Runner(model, bm.num_blocks, self.block_size, max_blocks, self.max_num_seqs, self.use_cuda_graphs)
        self.bm, self.scheduler, self.runner = bm, sched, runner
        bar = _progress(len(seqs), use_tqdm)
        steps, t0 = 0, time.perf_counter()
        self.stats_discarded_steps = 0
        root = self._common_prefix([g[0] for g in groups]) if self.prefix_sharing else None
        try:
            if root is not None:  # the prompts' common prefix: prefilled once, its blocks shared
                bm.allocate(root)
                runner.prefill([root], bm)
                sched.prefix = root
            while not sched.is_finished:
                done, n = self._step(sched, bm, runner)
                steps += n
                if bar is not None and done:
                    bar.update(done)
        finally:
            if root is not None and root.block_table:
                bm.free(root)
            self.stats = {"steps": steps, "seconds": time.perf_counter() - t0, "num_blocks": bm.num_blocks,
                          "block_size": self.block_size, "peak_blocks_used": bm.peak_used,
                          "kv_bytes_allocated": runner.kv_bytes,
                          "peak_kv_bytes": bm.peak_used * runner.kv_bytes // bm.num_blocks,
                          "preemptions": sched.num_preemptions, "discarded_steps": self.stats_discarded_steps,
                          "common_prefix_tokens": len(root) if root is not None else 0,
                          "graph_capture_s": runner.capture_s}
            runner.free()
            self.runner = None
            if bar is not None:
                bar.close()

    def _common_prefix(self, leaders: list[Sequence]) -> Sequence | None:
        """A root sequence holding the whole blocks that every prompt of the call starts with (a
        system prompt, a chat template), or None: fewer than two prompts, less than one block in
        common, or less than a quarter of the prompts' mean length (the prefill after a cached prefix
        is a masked attention per sequence where flash-attn is not installed, so a few shared tokens
        in front of long, ragged prompts would cost more than they save). Every prompt keeps at
        least one token after it (its prefill samples from that row).
        NOTE: SmolLM2-135M, the GRPO TOML's prompts (~126 tokens, ~120 of them the chat template with
        two worked examples), 8 prompts x 4 samples: the prefill was 1.7 of a 5.7 s rollout (2 threads)."""
        if len(leaders) < 2:
            return None
        n = common_prefix_len([s.token_ids for s in leaders]) // self.block_size * self.block_size
        if n == 0 or 4 * n * len(leaders) < sum(len(s) for s in leaders):
            return None
        return Sequence(leaders[0].token_ids[:n], leaders[0].params)

    def _step(self, sched: Scheduler, bm: BlockManager, runner: Runner) -> tuple[int, int]:
        """One schedule: a prefill, one decode step, or a window of decode steps. -> (finished, steps)."""
        seqs, is_prefill, copies = sched.schedule()
        runner.copy_blocks(copies)
        if is_prefill:
            compute = [s for s in seqs if s.leader is None]
            row = {s.seq_id: i for i, s in enumerate(compute)}
            logits = runner.prefill(compute, bm)
            logits = logits[torch.tensor([row[(s.leader or s).seq_id] for s in seqs], device=logits.device)]
        else:
            k = min(self.window, min(s.params.max_tokens - s.num_completion_tokens for s in seqs))
            if k > 1:
                return self._decode_window(sched, seqs, runner, sched.reserve_steps(seqs, k))
            logits = runner.decode(seqs, bm)
        tokens, logprobs = self._sample(seqs, logits)
        finished = 0
        for s, t, lp in zip(seqs, tokens, logprobs):
            s.leader = None
            s.num_cached_tokens = len(s)
            was_forced = bool(s.forced)
            if was_forced:
                s.forced.pop(0)
            s.append(t, lp)
            if self.think_ids is not None:
                self._think(s, was_forced, bm)
            finished += self._maybe_finish(s, sched)
        return finished, 1

    def _maybe_finish(self, s: Sequence, sched: Scheduler) -> int:
        reason = self._stop_reason(s)
        if reason is None:
            return 0
        s.finish_reason = reason
        sched.finish(s)
        return 1

    # -- decode windows ----------------------------------------------------------------------
    def _setup_window(self, params: SamplingParams, shared: bool):
        """Several decode steps per schedule when nothing but a stop token or max_tokens can end a
        sequence: no thinking control, no stop strings (they need the text), one SamplingParams."""
        ok = shared and self.think_ids is None and not params.stop_strings
        self.window = self.decode_window if ok else 1
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        self.window_stop_ids = sorted(stop)

    def _decode_window(self, sched: Scheduler, seqs: list[Sequence], runner: Runner, k: int) -> tuple[int, int]:
        """k decode steps of a fixed batch from device tensors; Python sees the sequences again only
        at the end. Equivalent to k single steps: the batch cannot change inside the window (prefill
        was not possible at its start, and only a finishing sequence could make it possible), blocks
        for all k steps are reserved up front, k <= every sequence's remaining max_tokens, and the
        window stops after the first step in which any sequence emits a stop token. Every row draws
        one uniform per step, as in single steps; draws of steps not run are given back.
        NOTE: tiny model, 8 x 8 samples, 64 new tokens, one thread: the per-step Python work (schedule,
        inputs, sampling arguments, appends, stop checks: about 1 ms per step for 64 sequences) was
        larger than the model's matmuls."""
        dev, p = runner.device, seqs[0].params
        B = len(seqs)
        ids = torch.tensor([s.token_ids[-1] for s in seqs], device=dev)  # (B,)
        pos = torch.tensor([len(s) - 1 for s in seqs], device=dev)
        tables = runner.decode_tables(seqs)  # (B, width), every slot of the window reserved
        args = self._sample_args(p, B, dev)
        u_host = torch.stack([s.uniforms(k) for s in seqs]) if args["any_sample"] else None  # (B, k)
        u = None if u_host is None else u_host.to(dev)
        stop = torch.tensor(self.window_stop_ids, dtype=torch.int64, device=dev) if self.window_stop_ids else None
        out = None if args["any_filter"] else runner.decode_window(
            ids, pos, tables, p.temperature if args["any_sample"] else 0.0, u, stop, k)
        if out is not None:  # the whole window in one C++ call (CPU, dense models)
            toks, lps = out
            done = toks.shape[1]
        else:
            toks = torch.empty(B, k, dtype=torch.int64, device=dev)
            lps = torch.empty(B, k, dtype=torch.float32, device=dev)
            done, lag = 0, self._lagged_stop_check(dev)
            prev_hit = None  # with lag: the previous step's "any stop token" flag, still on the device
            while done < k:
                logits = runner.decode_step(ids, pos, tables)
                ids, lp = self.sampler(logits, **args, u=None if u is None else u[:, done])
                toks[:, done], lps[:, done] = ids, lp
                done += 1
                if stop is not None:
                    hit = torch.isin(ids, stop).any()
                    if not lag and bool(hit):
                        break
                    if lag and prev_hit is not None and bool(prev_hit):  # this step ran one too far
                        done -= 1
                        self.stats_discarded_steps += 1
                        break
                    prev_hit = hit
                pos = pos + 1
        finished = 0
        lps = lps[:, :done].tolist()
        check_logprobs(seqs, lps)
        for b, (s, t, lp) in enumerate(zip(seqs, toks[:, :done].tolist(), lps)):
            s.leader = None
            s.num_cached_tokens = len(s) + done - 1
            s.token_ids.extend(t)
            s.logprobs.extend(lp)
            if u is not None and done < k:
                s.unread_uniforms(u_host[b, done:])  # the host copy: no device sync per sequence
            finished += self._maybe_finish(s, sched)
        return finished, done

    def _lagged_stop_check(self, dev) -> bool:
        """Whether a Python-loop window reads each step's stop flag one step late. On CUDA, reading it
        at once (a device sync) leaves the GPU idle while the host launches the next step; read one
        step late, the next step is already queued, and a window that meets a stop token runs one
        step too many, which is discarded (its token and uniform given back, its K/V rewritten by the
        next step at the same slot). The outputs are the same either way (test_decode_window_*)."""
        return dev.type == "cuda" if self.lagged_stop_check is None else bool(self.lagged_stop_check)

    def _sample_args(self, p: SamplingParams, B: int, dev) -> dict:
        """Sampler arguments for B rows that share one SamplingParams (tensors made once per window)."""
        full = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt, device=dev)  # noqa: E731
        sample = p.temperature > 0
        return {"temperatures": full(p.temperature), "top_k": full(p.top_k, torch.int64), "top_p": full(p.top_p),
                "min_p": full(p.min_p), "any_sample": sample, "any_greedy": not sample,
                "any_filter": sample and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0)}

    def _sample(self, seqs, logits):
        dev = logits.device
        ps = [s.params for s in seqs]
        cols = torch.tensor([[p.temperature, p.top_p, p.min_p, p.top_k, s.forced[0] if s.forced else -1]
                             for s, p in zip(seqs, ps)], dtype=torch.float64).to(dev, non_blocking=True)  # (B, 5)
        temp, top_p, min_p = (cols[:, i].float() for i in range(3))
        top_k, forced = cols[:, 3].long(), cols[:, 4].long()
        any_sample = any(p.temperature > 0 for p in ps)
        any_filter = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in ps if p.temperature > 0)
        any_greedy = any(p.temperature == 0 for p in ps)
        u = torch.cat([s.uniforms(1) for s in seqs]) if any_sample else None
        # host-side facts, as a decode window's: a batch of one kind takes one sampler path in both
        tokens, logprobs = self.sampler(logits, temp, top_k, top_p, min_p, None,
                                        forced if any(s.forced for s in seqs) else None, any_sample=any_sample,
                                        any_filter=any_filter, any_greedy=any_greedy, u=u)
        out = torch.stack([tokens.double(), logprobs.double()]).cpu()  # one device -> host copy
        lps = out[1].tolist()
        check_logprobs(seqs, [[v] for v in lps])
        return [int(t) for t in out[0].tolist()], lps

    # -- thinking control and stopping -------------------------------------------------------
    def _enter_think_from_prompt(self, s: Sequence):
        if self.think_ids is not None and opens_think(s.token_ids, self.think_ids["start"], self.think_ids["end"]):
            s.think.inside = True
            if s.params.think_budget == 0:
                self._close_think(s)

    def _think(self, s: Sequence, was_forced: bool, bm: BlockManager):
        ids, st, p = self.think_ids, s.think, s.params
        if not st.inside:
            if _ends_with(s.completion_ids, ids["start"]):
                st.inside, st.tokens = True, 0
                if p.think_budget == 0:
                    self._close_think(s)
            return
        end = ids["end"]
        if st.closing:  # emitting a forced "</think>"
            if not s.forced:
                st.inside = st.closing = False
            return
        if _ends_with(s.completion_ids, end):
            st.tokens -= len(end) - 1  # the tag's earlier pieces were counted as thinking tokens
            if not was_forced and st.extensions < p.think_extend:
                s.truncate(len(s) - len(end))
                bm.trim(s)
                st.extensions += 1
                s.forced = list(ids["extend"])
                if p.think_budget is not None and st.tokens >= p.think_budget:
                    self._close_think(s)
            else:
                st.inside = False
            return
        st.tokens += 1
        if p.think_budget is not None and st.tokens >= p.think_budget:
            self._close_think(s)

    def _close_think(self, s: Sequence):
        """Force "</think>"; if the model already started the tag (multi-token tags), complete it."""
        end = self.think_ids["end"]
        done = next((k for k in range(len(end) - 1, 0, -1) if _ends_with(s.completion_ids, end[:k])), 0)
        s.forced, s.think.closing = list(end[done:]), True

    def _stop_reason(self, s: Sequence) -> str | None:
        t, p = s.token_ids[-1], s.params
        if (not p.ignore_eos and t in self.eos_token_ids) or t in p.stop_token_ids:
            return "stop"
        if p.stop_strings and self.tokenizer is not None:
            width = max(len(x.encode()) for x in p.stop_strings) + 2  # a token holds >= 1 byte (emoji: 4)
            tail = self.tokenizer.decode(s.completion_ids[-width:])
            if any(x in tail for x in p.stop_strings):
                return "stop"
        if s.num_completion_tokens >= p.max_tokens:
            return "length"
        return None

    def _completion(self, s: Sequence) -> Completion:
        ids = s.completion_ids
        text = None
        if self.tokenizer is not None:
            body = ids[:-1] if s.finish_reason == "stop" and (ids[-1] in self.eos_token_ids or ids[-1] in s.params.stop_token_ids) else ids
            text = self.tokenizer.decode(body)
            cuts = [text.find(x) for x in s.params.stop_strings if x in text]
            if cuts:
                text = text[: min(cuts)]
        return Completion(token_ids=list(ids), logprobs=list(s.logprobs), finish_reason=s.finish_reason,
                          length=len(ids), text=text)


def _progress(total, use_tqdm):
    if not use_tqdm:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="generate")
