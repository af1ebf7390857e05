"""The paged rollout engine: against transformers' greedy generate, prefix sharing, preemption,
block-manager invariants, seeded sampling, log-probs against the training path, thinking control."""
import os
import random

import pytest
import torch
from torch import nn

from reasonrl.engine import LLMEngine, SamplingParams
from reasonrl.engine.block_manager import BlockManager
from reasonrl.engine.scheduler import Scheduler
from reasonrl.engine.sequence import Sequence
from reasonrl.models import AttnContext, builtin_path, init_model, load_model, load_tokenizer
from reasonrl.models.attention import _sdpa as _SDPA

V = 61


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random tiny grouped-query Llama in transformers, and the same weights in reasonrl.models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.15, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    hf = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path)
    return hf, load_model(str(path))


def hf_greedy(hf, prompt, n_new):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def random_prompts(n, lo=1, hi=20):
    return [torch.randint(0, V, (random.randint(lo, hi),)).tolist() for _ in range(n)]


def full_logprobs(model, seq_ids, n_prompt, temperature):
    """The training path: one plain forward over prompt + completion, log_softmax(logits / T)."""
    ids = torch.tensor(seq_ids)
    with torch.no_grad():
        h = model(ids, torch.arange(len(ids)), AttnContext.from_lengths([len(ids)]))
        logits = model.compute_logits(h)[n_prompt - 1:-1].double()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(1, ids[n_prompt:, None]).squeeze(1)


# ---- greedy == transformers --------------------------------------------------------------------
@pytest.mark.parametrize("batch,block_size,threads", [(1, 16, 1), (7, 3, 1), (64, 8, 1), (64, 8, 2)])
def test_greedy_matches_transformers(hf_and_ours, batch, block_size, threads):
    """threads=2: on CPU, decode steps of 32 rows split over two threads (LeanDecode.chunks)."""
    hf, model = hf_and_ours
    random.seed(torch.initial_seed())
    prompts = random_prompts(batch)
    n_new = 10
    eng = LLMEngine(model, block_size=block_size, eos_token_ids=[], max_num_seqs=32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from reasonrl.engine.decode_forward import lean_decode
        assert threads == 1 or lean_decode(model).chunks(32) == 2  # the split path runs
        out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=n_new))
    finally:
        torch.set_num_threads(before)
    checked = prompts if batch <= 8 else prompts[:: batch // 8]  # transformers is slow: a spread sample
    for p in checked:
        got = out[prompts.index(p)][0]
        assert got.token_ids == hf_greedy(hf, p, n_new), f"prompt of length {len(p)}"
        assert got.finish_reason == "length" and got.length == n_new
    assert eng.bm.num_free == eng.bm.num_blocks  # every block back on the free list


def test_preemption_recompute_gives_same_greedy(hf_and_ours):
    hf, model = hf_and_ours
    prompts = random_prompts(8, 5, 12)
    params = SamplingParams(temperature=0, max_tokens=16)
    roomy = LLMEngine(model, block_size=4, eos_token_ids=[]).generate(prompts, params)
    eng = LLMEngine(model, block_size=4, eos_token_ids=[])
    bpb = 2 * 2 * 4 * 2 * 12 * 4  # 2 (k, v) * layers * block_size * Hkv * D * 4 bytes
    eng.kv_cache_bytes = 12 * bpb  # 12 blocks for 8 sequences of up to 28 tokens: forces preemption
    tight = eng.generate(prompts, params)
    assert eng.stats["preemptions"] > 0 and eng.stats["num_blocks"] == 12
    assert [c[0].token_ids for c in tight] == [c[0].token_ids for c in roomy]
    assert tight[3][0].token_ids == hf_greedy(hf, prompts[3], 16)


def test_sequence_that_can_never_fit_is_refused(hf_and_ours):
    _, model = hf_and_ours
    eng = LLMEngine(model, block_size=4, kv_cache_bytes=2 * 2 * 4 * 2 * 12 * 4 * 3)
    with pytest.raises(ValueError, match="needs 4 KV blocks but the cache has 3"):
        eng.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[1, V]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="stop_strings need"):
        eng.generate([[1, 2]], SamplingParams(max_tokens=2, stop_strings=("x",)))
    with pytest.raises(ValueError, match="think_budget"):
        eng.generate([[1, 2]], SamplingParams(max_tokens=2, think_budget=3))


# ---- prefix sharing ------------------------------------------------------------------------------
def test_prefix_shared_groups_equal_unshared(hf_and_ours):
    _, model = hf_and_ours
    prompts = random_prompts(3, 5, 21)
    params = SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=1234)
    shared = LLMEngine(model, block_size=4, eos_token_ids=[])
    unshared = LLMEngine(model, block_size=4, eos_token_ids=[], prefix_sharing=False)
    a, b = shared.generate(prompts, params, n=6), unshared.generate(prompts, params, n=6)
    for ga, gb in zip(a, b):
        assert [c.token_ids for c in ga] == [c.token_ids for c in gb]
        for ca, cb in zip(ga, gb):
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4)
        assert len({tuple(c.token_ids) for c in ga}) > 1  # the samples of a group differ
    assert shared.stats["peak_blocks_used"] < unshared.stats["peak_blocks_used"]


def template_prompts(n, template_len=23, lo=1, hi=9, seed=0):
    """n prompts that start with the same template_len tokens (a system prompt), then their own."""
    rng = random.Random(seed)
    template = [rng.randrange(V) for _ in range(template_len)]
    return [template + [rng.randrange(V) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("padded", [True, False])
def test_common_prefix_prefilled_once_equals_unshared(hf_and_ours, monkeypatch, padded):
    """The whole blocks that all prompts start with are prefilled once and shared; the rest of each
    prompt is prefilled against them (one padded attention call, or one per sequence): the same
    tokens and log-probs as prefilling every prompt whole, fewer blocks, all freed at the end."""
    import reasonrl.models.attention as attn
    hf, model = hf_and_ours
    prompts = template_prompts(5)
    if not padded:
        monkeypatch.setattr(attn, "MASK_BUDGET", 1)  # the per-sequence path
    for params in (SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=1.0, max_tokens=12, seed=3)):
        eng = LLMEngine(model, block_size=4, eos_token_ids=[])
        got = eng.generate(prompts, params, n=3)
        assert eng.stats["common_prefix_tokens"] == 20  # 23 common tokens: 5 whole blocks
        assert eng.stats["graph_capture_s"] == 0.0  # CPU: no CUDA graphs
        assert eng.bm.num_free == eng.bm.num_blocks
        with monkeypatch.context() as m:
            m.setattr(LLMEngine, "_common_prefix", lambda self, leaders: None)
            ref_eng = LLMEngine(model, block_size=4, eos_token_ids=[])
            ref = ref_eng.generate(prompts, params, n=3)
        assert ref_eng.stats["common_prefix_tokens"] == 0
        assert eng.stats["peak_blocks_used"] < ref_eng.stats["peak_blocks_used"]
        for ga, gb in zip(got, ref):
            assert [c.token_ids for c in ga] == [c.token_ids for c in gb]
            for ca, cb in zip(ga, gb):
                assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5)
    assert got[0][0].token_ids != got[0][1].token_ids  # sampled
    greedy = LLMEngine(model, block_size=4, eos_token_ids=[]).generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))
    assert greedy[1][0].token_ids == hf_greedy(hf, prompts[1], 8)


@pytest.mark.parametrize("budget", [1 << 26, 1])  # one padded call / one call per sequence
def test_prefix_prefill_attention_ignores_unwritten_slots(monkeypatch, budget):
    """The CPU KV cache is not zeroed: slots never written may hold NaN. The prefill after a cached
    prefix reads only each sequence's first ctx_lens positions, whatever its padding covers."""
    import reasonrl.models.attention as attn
    from reasonrl.models.context import AttnContext as Ctx
    monkeypatch.setattr(attn, "MASK_BUDGET", budget)
    calls = []
    monkeypatch.setattr(attn, "_sdpa", lambda *a, **k: calls.append(a[0].shape[0]) or _SDPA(*a, **k))
    bs, Hq, Hkv, D = 4, 4, 2, 8
    lengths, ctx_lens = [4, 5, 3], [11, 13, 9]  # new tokens, all tokens of each sequence
    tables = torch.tensor([[3, 8, 5, 0], [1, 2, 4, 6], [7, 9, 10, 0]], dtype=torch.int32)
    k_cache = torch.full((12, bs, Hkv, D), float("nan"), dtype=torch.float64)
    v_cache = k_cache.clone()
    keys, vals = [], []
    for b, c in enumerate(ctx_lens):
        k, v = torch.randn(c, Hkv, D, dtype=torch.float64), torch.randn(c, Hkv, D, dtype=torch.float64)
        for p in range(c):
            k_cache[tables[b, p // bs], p % bs], v_cache[tables[b, p // bs], p % bs] = k[p], v[p]
        keys.append(k), vals.append(v)
    q = torch.randn(sum(lengths), Hq, D, dtype=torch.float64)
    ctx = Ctx(cu_seqlens=torch.tensor([0, 4, 9, 12], dtype=torch.int32), max_seqlen=5, is_prefill=True,
              block_tables=tables, context_lens=torch.tensor(ctx_lens, dtype=torch.int32))
    out = attn.prefix_prefill_attention(q, k_cache, v_cache, ctx, lengths, ctx_lens, D ** -0.5)
    start = 0
    for b, (n, c) in enumerate(zip(lengths, ctx_lens)):
        k, v = keys[b].repeat_interleave(Hq // Hkv, 1), vals[b].repeat_interleave(Hq // Hkv, 1)  # (c, Hq, D)
        s = torch.einsum("ihd,jhd->hij", q[start:start + n], k) * D ** -0.5
        s = s.masked_fill(torch.arange(c)[None, :] > (c - n + torch.arange(n))[:, None], float("-inf"))
        want = torch.einsum("hij,jhd->ihd", s.softmax(-1), v)
        assert torch.allclose(out[start:start + n], want, atol=1e-12), b
        start += n
    assert calls == ([3] if budget > 1 else [1, 1, 1])  # the path named by the parameter ran


def test_cache_rows_gather_each_sequences_positions():
    """The flash-attn path of a prefill after a cached prefix gathers keys by _cache_rows: the same
    rows, in order, as reading each sequence's block table position by position."""
    from reasonrl.models.attention import _cache_rows
    bs, tables = 4, torch.tensor([[3, 0, 5, 0], [1, 2, 4, 6], [7, 0, 0, 0]], dtype=torch.int32)
    lens = [9, 16, 1]
    want = [int(tables[b, p // bs]) * bs + p % bs for b, n in enumerate(lens) for p in range(n)]
    assert _cache_rows(tables, lens, bs).tolist() == want


def test_common_prefix_only_where_every_prompt_has_it(hf_and_ours):
    """No root for one prompt, for prompts that differ within the first block, or for a common part
    under a quarter of the prompts' mean length; a prompt no longer than the common part keeps at
    least one token of its own to prefill."""
    _, model = hf_and_ours
    eng = LLMEngine(model, block_size=4, eos_token_ids=[])
    params = SamplingParams(temperature=0, max_tokens=3)
    t = template_prompts(3)
    for prompts, want in [(t[:1], 0), ([[1, 2, 3, 9, 9], [1, 2, 4, 9, 9]], 0), (t + [t[0][:9]], 8),
                          (t + [t[0][:8]], 0),
                          ([t[0][:8] + [1] * 20, t[0][:8] + [2] * 20], 8), ([t[0][:8] + [1] * 40, t[0][:8] + [2] * 40], 0),
                          ([t[0], t[0]], (len(t[0]) - 1) // 4 * 4)]:
        eng.generate(prompts, params)
        assert eng.stats["common_prefix_tokens"] == want, prompts
        assert eng.bm.num_free == eng.bm.num_blocks


def test_common_prefix_under_preemption(hf_and_ours):
    """A tight cache preempts; recomputed sequences share the cached prefix again: same tokens."""
    _, model = hf_and_ours
    prompts = template_prompts(8, template_len=9, lo=2, hi=6, seed=1)
    params = SamplingParams(temperature=0, max_tokens=16)
    roomy = LLMEngine(model, block_size=4, eos_token_ids=[]).generate(prompts, params)
    eng = LLMEngine(model, block_size=4, eos_token_ids=[])
    eng.kv_cache_bytes = 14 * (2 * 2 * 4 * 2 * 12 * 4)  # 14 blocks for 8 sequences of up to 31 tokens
    tight = eng.generate(prompts, params)
    assert eng.stats["preemptions"] > 0 and eng.stats["common_prefix_tokens"] == 8
    assert [c[0].token_ids for c in tight] == [c[0].token_ids for c in roomy]
    assert eng.bm.num_free == eng.bm.num_blocks


# ---- block manager invariants under random workloads ----------------------------------------------
@pytest.mark.parametrize("num_blocks,block_size", [(12, 2), (40, 5), (9, 4)])
@pytest.mark.parametrize("common_prefix", [False, True])
def test_block_manager_invariants_random_workload(num_blocks, block_size, common_prefix):
    """common_prefix: a cached root block of [0] * block_size that the longer prompts start with and
    share (the shorter ones cannot), held until the end as the engine holds it."""
    rng = random.Random(torch.initial_seed())
    bm = BlockManager(num_blocks, block_size)
    # the small caches must see preemption (asserted below): enough sequences at once to run out of blocks
    sched = Scheduler(bm, max_num_seqs=rng.randint(8 if num_blocks <= 12 else 2, 12),
                      max_num_batched_tokens=rng.randint(8, 40))
    root = Sequence([0] * block_size, SamplingParams()) if common_prefix else None
    if root is not None:
        bm.allocate(root)
        sched.prefix = root
    shared_prefills = 0
    target = {}
    for _ in range(14):
        prompt = [0] * rng.randint(1, 7)
        if root is not None and not target:
            prompt = [0] * (block_size + 1)  # at least one prompt past the root
        group = [Sequence(prompt, SamplingParams(max_tokens=30), sample_index=j) for j in range(rng.randint(1, 4))]
        for s in group:
            target[s.seq_id] = len(prompt) + rng.randint(1, 12)
            sched.check_fits(s, target[s.seq_id])
        group[0].followers = group[1:]
        sched.add(group[0])
    finished = 0
    for _ in range(10_000):
        if sched.is_finished:
            break
        seqs, is_prefill, copies = sched.schedule()
        for src, dst in copies:
            assert bm.ref_counts[dst] == 1 and src != dst
        if is_prefill and root is not None:
            for s in seqs:
                if s.leader is None and s.num_cached_tokens:
                    assert s.block_table[0] == root.block_table[0] and s.num_cached_tokens == block_size
                    shared_prefills += 1
        for s in seqs:
            s.leader = None
            s.num_cached_tokens = len(s)
            s.append(1, 0.0)
            if rng.random() < 0.1 and s.num_completion_tokens > 2:  # thinking control drops tokens
                s.truncate(len(s) - 2)
                bm.trim(s)
            if len(s) >= target[s.seq_id]:
                sched.finish(s)
                finished += 1
        bm.check(list(sched.running) + ([root] if root is not None else []))
        assert all(not s.block_table for s in sched.waiting)
    assert sched.is_finished and finished == len(target)
    if root is not None:
        assert shared_prefills > 0
        bm.free(root)
    assert bm.ref_counts == [0] * num_blocks and bm.num_free == num_blocks
    if num_blocks <= 12:
        assert sched.num_preemptions > 0


def test_copy_on_write_of_shared_partial_block():
    bm = BlockManager(8, 4)
    a, b = Sequence([5] * 6, SamplingParams()), Sequence([5] * 6, SamplingParams())
    bm.allocate(a)
    bm.fork(a, b)
    assert bm.ref_counts[a.block_table[1]] == 2
    a.append(7, 0.0)  # position 6 lies in the shared, partial second block
    b.append(8, 0.0)
    assert bm.append_slot(a) == (b.block_table[1], a.block_table[1])
    assert bm.append_slot(b) is None  # b now owns the old block alone
    assert a.block_table[0] == b.block_table[0] and a.block_table[1] != b.block_table[1]
    bm.check([a, b])
    bm.free(a), bm.free(b)
    assert bm.num_free == 8


# ---- sampling --------------------------------------------------------------------------------------
def test_seeded_sampling_reproducible_across_batches(hf_and_ours):
    _, model = hf_and_ours
    p, others = random_prompts(1)[0], random_prompts(5)
    params = SamplingParams(temperature=0.9, top_p=0.9, min_p=0.02, max_tokens=16, seed=7)
    eng = LLMEngine(model, block_size=4, eos_token_ids=[])
    alone = eng.generate([p], params, n=3)[0]
    mixed = eng.generate(others[:2] + [p] + others[2:], params, n=3)[2]
    assert [c.token_ids for c in alone] == [c.token_ids for c in mixed]
    other_seed = eng.generate([p], SamplingParams(temperature=0.9, max_tokens=16, seed=8), n=3)[0]
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 0.8), (0.0, 0, 1.0)])
def test_logprobs_match_training_path(hf_and_ours, temperature, top_k, top_p):
    _, model = hf_and_ours
    from reasonrl.ops import token_logprobs

    prompts = random_prompts(4)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=15)
    out = LLMEngine(model, block_size=4, eos_token_ids=[]).generate(prompts, params, n=3)
    t_eff = temperature or 1.0  # greedy rows report log-probs at T = 1
    for p, group in zip(prompts, out):
        for c in group:
            ref = full_logprobs(model, p + c.token_ids, len(p), t_eff)
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            assert (got - ref).abs().max() < 1e-4
            ids = torch.tensor(p + c.token_ids)
            with torch.no_grad():
                h = model(ids, torch.arange(len(ids)), AttnContext.from_lengths([len(ids)]))
                logits = model.compute_logits(h)[len(p) - 1:-1]
            train = token_logprobs(logits, ids[len(p):], temperature=t_eff)
            assert (got - train.double()).abs().max() < 1e-4
            if top_k:
                ranks = (logits.gather(1, ids[len(p):, None]) < logits).sum(1)
                assert (ranks < top_k).all()  # top-k held


def test_sampler_filters():
    from reasonrl.engine.sampler import Sampler

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(400, 1)
    B = logits.shape[0]
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    f = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt)  # noqa: E731
    tok, _ = Sampler()(logits, f(1.0), f(2, torch.int64), f(1.0), f(0.0), gens)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = Sampler()(logits, f(1.0), f(0, torch.int64), f(0.5), f(0.0), gens)  # p0 = 0.64 > 0.5
    assert set(tok.tolist()) == {0}
    tok, _ = Sampler()(logits, f(1.0), f(0, torch.int64), f(1e-46), f(0.0), gens)  # 0 in float32: was an index error
    assert set(tok.tolist()) == {0}
    tok, _ = Sampler()(logits, f(1.0), f(0, torch.int64), f(1.0), f(0.3), gens)  # e^-1 = 0.37 >= 0.3
    assert set(tok.tolist()) == {0, 1}
    # top-p keeps the token that crosses p (0.64 + 0.24 < 0.9 <= 0.97): {0, 1, 2}; at an exact boundary
    # (p0 = 0.5 = top_p) the next token is out; min-p keeps ties with the top (p >= min_p * p_max)
    tok, _ = Sampler()(logits, f(1.0), f(0, torch.int64), f(0.9), f(0.0), gens)
    assert set(tok.tolist()) == {0, 1, 2}
    two = torch.zeros(B, 2)
    tok, _ = Sampler()(two, f(1.0), f(0, torch.int64), f(0.5), f(0.0), gens)
    assert set(tok.tolist()) == {0}
    tok, _ = Sampler()(two, f(1.0), f(0, torch.int64), f(1.0), f(1.0), gens)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = Sampler()(logits, f(1.0), f(0, torch.int64), f(1.0), f(0.0), gens)
    freq = torch.bincount(tok, minlength=5).double() / B
    assert (freq - torch.softmax(logits[0].double(), 0)).abs().max() < 0.1


# ---- thinking control and stop conditions, with a scripted model ------------------------------------
class ScriptedModel(nn.Module):
    """Next token = rule[previous token] (greedy), so outputs are known exactly."""

    def __init__(self, vocab, rule):
        super().__init__()
        from types import SimpleNamespace
        self.config = SimpleNamespace(vocab_size=vocab, num_hidden_layers=1, num_key_value_heads=1, eos_token_id=None)
        self.head_dim = 2
        self.table = nn.Parameter(torch.full((vocab, vocab), -10.0), requires_grad=False)
        for prev, nxt in rule.items():
            self.table.data[prev, nxt] = 10.0

    def forward(self, input_ids, positions, ctx):
        return self.table[input_ids]

    def compute_logits(self, hidden):
        return hidden


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(builtin_path("tiny"))


def scripted(tok, pairs, default):
    t = lambda s: tok.convert_tokens_to_ids(s)  # noqa: E731
    rule = {i: t(default) for i in range(len(tok))}
    rule.update({t(a): t(b) for a, b in pairs})
    return ScriptedModel(len(tok), rule)


def test_think_budget_forces_end_of_thinking(tok):
    model = scripted(tok, [("</think>", "x"), ("x", "<eos>")], "a")  # never ends thinking by itself
    eng = LLMEngine(model, tokenizer=tok, block_size=4)
    prompt = tok.encode("q?<think>", add_special_tokens=False)
    for budget in (0, 1, 7):
        c = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=40, think_budget=budget))[0][0]
        assert c.text == "a" * budget + "</think>x" and c.finish_reason == "stop"
    c = eng.generate([tok.encode("q?", add_special_tokens=False)],
                     SamplingParams(temperature=0, max_tokens=40, think_budget=5))[0][0]
    assert "<think>" not in c.text and c.finish_reason == "length"  # no thinking span, nothing forced


def test_think_extend_replaces_end_with_wait(tok):
    pairs = [("a", "b"), ("b", "c"), ("c", "</think>"), ("</think>", "x"), ("x", "<eos>")]
    model = scripted(tok, pairs, "a")
    eng = LLMEngine(model, tokenizer=tok, block_size=3)
    prompt = tok.encode("<think>", add_special_tokens=False)
    c = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=60, think_extend=2), n=2)[0]
    assert [x.text for x in c] == ["abcWaitabcWaitabc</think>x"] * 2
    c = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=60, think_extend=5, think_budget=9))[0][0]
    assert c.text == "abcWaitab</think>x"  # 9 thinking tokens, then forced end
    assert len(c.logprobs) == c.length == len(c.token_ids)
    eng.bm.check([])


def test_stop_conditions(tok):
    model = scripted(tok, [("a", "b"), ("b", "c"), ("c", "d"), ("d", "<eos>")], "a")
    eng = LLMEngine(model, tokenizer=tok, block_size=4)
    p = [tok.encode("z", add_special_tokens=False)]
    c = eng.generate(p, SamplingParams(temperature=0))[0][0]
    assert c.text == "abcd" and c.finish_reason == "stop" and c.length == 5
    c = eng.generate(p, SamplingParams(temperature=0, max_tokens=3))[0][0]
    assert c.text == "abc" and c.finish_reason == "length"
    c = eng.generate(p, SamplingParams(temperature=0, stop_strings=("bc",)))[0][0]
    assert c.text == "a" and c.finish_reason == "stop" and c.length == 3
    stop_c = tok.convert_tokens_to_ids("c")
    c = eng.generate(p, SamplingParams(temperature=0, stop_token_ids=(stop_c,)))[0][0]
    assert c.token_ids[-1] == stop_c and c.text == "ab"
    c = eng.generate(p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=12))[0][0]
    assert c.length == 12 and c.finish_reason == "length"
    out = eng.generate_text(["z", "zz"], SamplingParams(temperature=0), n=2)
    assert [[x.text for x in g] for g in out] == [["abcd"] * 2] * 2


def test_engine_with_builtin_tiny_model_and_token_logprobs(tok):
    model = init_model(builtin_path("tiny"), seed=random.randint(0, 1000))
    eng = LLMEngine(model, tokenizer=tok, block_size=16)
    prompts = [tok.encode(f"{a}*{b}=<think>", add_special_tokens=False) for a, b in ((12, 3), (456, 7))]
    out = eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=30, think_budget=6), n=8)
    for p, group in zip(prompts, out):
        for c in group:
            ids = c.token_ids
            end = tok.convert_tokens_to_ids("</think>")
            assert end in ids[:7] or c.finish_reason == "stop" and len(ids) <= 7
            ref = full_logprobs(model, p + ids, len(p), 1.0)
            assert (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max() < 1e-4


# ---- GPU: CUDA-graph decode ----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("graphs,template", [(True, False), (False, False), (True, True)])
def test_gpu_greedy_matches_transformers(hf_and_ours, graphs, template):
    """template: the prompts share 23 tokens, prefilled once (LLMEngine._common_prefix)."""
    hf, model = hf_and_ours
    dev = torch.device("cuda")
    hf_gpu = hf.to(dev)
    ours = load_model_like(model, dev)
    prompts = template_prompts(20, seed=2) if template else random_prompts(20)
    eng = LLMEngine(ours, block_size=16, eos_token_ids=[], use_cuda_graphs=graphs)
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    assert eng.stats["common_prefix_tokens"] == (16 if template else 0)
    assert (eng.stats["graph_capture_s"] > 0) == graphs
    from reasonrl.engine.decode_forward import adjacent_rows

    a, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp  # the fused GEMMs' weights are packed
    assert adjacent_rows([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) is not None
    assert adjacent_rows([mlp.gate_proj.weight, mlp.up_proj.weight]) is not None
    for p, g in zip(prompts[::4], out[::4]):
        ids = torch.tensor([p], device=dev)
        ref = hf_gpu.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert g[0].token_ids == ref
    if graphs:
        sampled = eng.generate(prompts[:3], SamplingParams(temperature=1.0, max_tokens=12, seed=3), n=4)
        for p, group in zip(prompts[:3], sampled):
            for c in group:
                ref = full_logprobs(model, p + c.token_ids, len(p), 1.0)
                assert (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max() < 1e-3
    hf.to("cpu")


@pytest.mark.gpu
def test_gpu_bf16_common_prefix_matches_unshared(hf_and_ours, monkeypatch):
    """A bf16 engine on CUDA: the prefill after the shared template (flash-attn's varlen kernel over the
    cached rows when installed, else padded SDPA) against prefilling every prompt whole."""
    _, model = hf_and_ours
    ours = load_model_like(model, torch.device("cuda")).to(torch.bfloat16)
    prompts = template_prompts(12, seed=4)
    params = SamplingParams(temperature=0, max_tokens=10)
    eng = LLMEngine(ours, block_size=16, eos_token_ids=[])
    got = eng.generate(prompts, params)
    assert eng.stats["common_prefix_tokens"] == 16
    monkeypatch.setattr(LLMEngine, "_common_prefix", lambda self, leaders: None)
    ref = LLMEngine(ours, block_size=16, eos_token_ids=[]).generate(prompts, params)
    for (a,), (b,) in zip(got, ref):
        assert a.token_ids[0] == b.token_ids[0]  # bf16 near-ties may part ways later, not at the start
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        diff = (torch.tensor(a.logprobs[:n]) - torch.tensor(b.logprobs[:n])).abs().max().item()
        assert diff < 5e-2, diff


@pytest.mark.gpu
def test_gpu_decode_window_with_stop_tokens(hf_and_ours):
    """On CUDA a window reads each step's stop flag one step late (LLMEngine._lagged_stop_check): the
    step run past a stop token is discarded, and the outputs are those of one step per schedule."""
    _, model = hf_and_ours
    ours = load_model_like(model, torch.device("cuda"))
    prompts = random_prompts(5, 1, 14)
    eos = torch.randint(0, V, (3,)).tolist()
    params = SamplingParams(temperature=1.0, max_tokens=37, seed=5, stop_token_ids=(eos[0],))
    outs, engines = [], []
    for window in (1, 16):
        eng = LLMEngine(ours, block_size=4, eos_token_ids=eos[1:], decode_window=window)
        outs.append(eng.generate(prompts, params, n=8))
        engines.append(eng)
        assert eng.bm.num_free == eng.bm.num_blocks
    assert engines[1].stats["discarded_steps"] > 0 and engines[0].stats["discarded_steps"] == 0
    for ga, gb in zip(*outs):
        for a, b in zip(ga, gb):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max() < 1e-5


def test_graph_sizes_reuse_a_captured_graph():
    """Runner._graph_rows: a CUDA graph captured in this call serves smaller batches (padded) up to
    max(2n, GRAPH_REUSE_ROWS) rows; otherwise the next size of GRAPH_BATCH_SIZES. The rule alone,
    on a CPU runner with its graph table filled by hand (graphs themselves need CUDA)."""
    from types import SimpleNamespace

    from reasonrl.engine.runner import GRAPH_REUSE_ROWS, Runner
    r = SimpleNamespace(use_graphs=True, max_graph_bs=512, graphs={})
    rows = lambda n: Runner._graph_rows(r, n)  # noqa: E731
    assert [rows(n) for n in (1, 3, 5, 20, 64, 65, 300)] == [1, 4, 8, 24, 64, 96, 384]  # none captured yet
    r.graphs = {64: None}
    assert [rows(n) for n in (1, 7, 33, 64)] == [64] * 4  # one graph serves the tail of a 64-row rollout
    assert rows(65) == 96 and GRAPH_REUSE_ROWS == 64
    r.graphs = {256: None, 64: None}
    assert rows(129) == 256 and rows(100) == 128 and rows(40) == 64  # above 64 rows: at most 2x the rows
    assert rows(513) == 0 and Runner._graph_rows(SimpleNamespace(use_graphs=False, max_graph_bs=0), 4) == 0


def load_model_like(model, device):
    import copy
    return copy.deepcopy(model).to(device)


def test_two_level_inverse_cdf_matches_flat():
    from reasonrl.engine.sampler import _inverse_cdf, _inverse_cdf_flat

    B, V = 64, 20_011
    logits = torch.randn(B, V, dtype=torch.float64) * 3
    logits[:, torch.randint(0, V, (500,))] = float("-inf")  # zero-probability tokens
    probs = torch.softmax(logits, -1)
    u = torch.rand(B, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 1e-16  # the ends
    got, ref = _inverse_cdf(probs, u), _inverse_cdf_flat(probs, u)
    assert torch.equal(got, ref)
    assert (probs.gather(1, got[:, None]) > 0).all()
    got32 = _inverse_cdf(probs.float(), u.float())
    assert (probs.gather(1, got32[:, None]) > 0).all() and (got32 != ref).float().mean() < 0.05


class CharTokenizer:
    """A tokenizer whose "</think>" and "Wait" are two tokens each (the tiny one has them as one)."""

    def __init__(self):
        self.pieces = ["<pad>", "<eos>", "<think>", "</th", "ink>", "Wa", "it", "a", "b", "c", "x", "q"]
        self.eos_token_id = 1

    def __len__(self):
        return len(self.pieces)

    def encode(self, s, add_special_tokens=False):
        ids = []
        while s:
            i = max((i for i, p in enumerate(self.pieces) if s.startswith(p)), key=lambda i: len(self.pieces[i]))
            ids.append(i)
            s = s[len(self.pieces[i]):]
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def convert_tokens_to_ids(self, s):
        return self.pieces.index(s)


def test_think_extend_with_multi_token_tags():
    tok = CharTokenizer()
    assert tok.encode("</think>") == [3, 4] and tok.encode("Wait") == [5, 6]
    pairs = [("a", "b"), ("b", "c"), ("c", "</th"), ("</th", "ink>"), ("ink>", "x"), ("x", "<eos>")]
    model = scripted(tok, pairs, "a")
    eng = LLMEngine(model, tokenizer=tok, block_size=2)
    prompt = tok.encode("q<think>")
    c = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=60, think_extend=2), n=3)[0]
    assert [x.text for x in c] == ["abcWaitabcWaitabc</think>x"] * 3
    assert all(len(x.logprobs) == x.length for x in c)
    c = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=60, think_budget=4))[0][0]
    assert c.text == "abc</think>x"  # the model's own end came first: 3 thinking tokens
    c = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=60, think_budget=2))[0][0]
    assert c.text == "ab</think>x"


class PositionBiased(nn.Module):
    """A real model whose "</think>" logit gets +40 at every 5th position: it ends thinking often,
    so think_extend rolls sequences back; the log-prob check then proves the cache stayed right."""

    def __init__(self, inner, end_id):
        super().__init__()
        self.inner, self.end_id = inner, end_id
        self.config, self.head_dim = inner.config, inner.head_dim

    def forward(self, input_ids, positions, ctx):
        h = self.inner(input_ids, positions, ctx)
        bias = ((positions % 5) == 4).to(h.dtype) * 40.0
        return torch.cat([h, bias[:, None]], 1)  # the bias rides along as one more column

    def compute_logits(self, hidden):
        logits = self.inner.compute_logits(hidden[:, :-1])
        return logits.index_add(1, torch.tensor([self.end_id]), hidden[:, -1:])


@pytest.mark.parametrize("template", ["", "Answer the question: "])  # with a cached common prefix
def test_think_extend_rollback_keeps_cache_consistent(tok, template):
    end = tok.convert_tokens_to_ids("</think>")
    model = PositionBiased(init_model(builtin_path("tiny"), seed=random.randint(0, 1000)), end)
    eng = LLMEngine(model, tokenizer=tok, block_size=3)
    prompts = [tok.encode(template + s, add_special_tokens=False) for s in ("1+2=<think>", "35*4=<think>")]
    out = eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=40, think_extend=3, ignore_eos=True), n=4)
    wait = tok.encode("Wait", add_special_tokens=False)
    n_ext = 0
    for p, group in zip(prompts, out):
        for c in group:
            ids = p + c.token_ids
            n_ext += sum(ids[i:i + len(wait)] == wait for i in range(len(ids)))
            x = torch.tensor(ids)
            with torch.no_grad():
                h = model(x, torch.arange(len(x)), AttnContext.from_lengths([len(x)]))
                ref = torch.log_softmax(model.compute_logits(h)[len(p) - 1:-1].double(), -1)
            ref = ref.gather(1, x[len(p):, None]).squeeze(1)
            assert (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max() < 1e-4
    assert n_ext > 0
    assert eng.stats["common_prefix_tokens"] == (len(template) // 3 * 3 if template else 0)
    eng.bm.check([])


# ---- decode windows (several decode steps per schedule) ---------------------------------------------
def test_uniform_stream_matches_scalar_draws():
    s = Sequence([1, 2], SamplingParams(seed=11))
    ref = torch.Generator().manual_seed(int(s.generator.initial_seed()))
    want = torch.stack([torch.rand((), generator=ref) for _ in range(40)])
    a, b = s.uniforms(7), s.uniforms(16)
    s.unread_uniforms(b[5:])  # a window cut after 5 steps gives back the rest
    got = torch.cat([a, b[:5], s.uniforms(3), s.uniforms(1), s.uniforms(20)])
    assert torch.equal(got, want[:36])


def test_sampler_with_drawn_uniforms_equals_generators():
    from reasonrl.engine.sampler import Sampler

    B, Vs = 33, 50
    logits = torch.randn(B, Vs) * 2
    temp = torch.rand(B) + 0.3
    temp[::5] = 0.0  # some greedy rows
    top_k, top_p, min_p = torch.randint(0, 10, (B,)), torch.rand(B) * 0.5 + 0.5, torch.rand(B) * 0.05
    seeds = torch.randint(0, 2**31, (B,)).tolist()
    gens = [torch.Generator().manual_seed(x) for x in seeds]
    ref = Sampler()(logits, temp, top_k, top_p, min_p, gens)
    u = torch.stack([torch.rand(1, generator=torch.Generator().manual_seed(x))[0] for x in seeds])
    got = Sampler()(logits, temp, top_k, top_p, min_p, u=u)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # all rows sampling, no greedy rows: the short path (no argmax) gives the same tokens
    ones = torch.ones(B)
    ref = Sampler()(logits, ones, top_k * 0, ones, ones * 0, u=u, any_filter=False)
    got = Sampler()(logits, ones, top_k * 0, ones, ones * 0, u=u, any_filter=False, any_greedy=False)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("temperature,top_p,block_size", [(1.0, 1.0, 4), (0.8, 0.9, 16), (0.0, 1.0, 3)])
def test_decode_window_equals_single_steps(hf_and_ours, temperature, top_p, block_size):
    """Windows end early at stop tokens and at max_tokens: tokens, log-probs, finish reasons and the
    block accounting are those of one step per schedule."""
    _, model = hf_and_ours
    prompts = random_prompts(5, 1, 14)
    seen = set()
    # up to 4 draws of stop tokens: a draw of tokens the model favours can stop all 40 samples early
    # (seen once in a CI run), and the check wants both endings; every draw is checked in full
    for _ in range(4):
        eos = torch.randint(0, V, (3,)).tolist()  # frequent enough at V=61 that many samples stop early
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=37, seed=5,
                                stop_token_ids=(eos[0],))
        outs, stats = [], []
        for window in (1, 16):
            eng = LLMEngine(model, block_size=block_size, eos_token_ids=eos[1:], decode_window=window)
            outs.append(eng.generate(prompts, params, n=8))
            stats.append(eng.stats)
            assert eng.bm.num_free == eng.bm.num_blocks
            eng.bm.check([])
        for ga, gb in zip(*outs):
            for a, b in zip(ga, gb):
                assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
                assert torch.equal(torch.tensor(a.logprobs), torch.tensor(b.logprobs))
        assert stats[1]["steps"] == stats[0]["steps"]  # the same model steps, fewer schedules
        seen |= {c.finish_reason for g in outs[0] for c in g}
        if temperature == 0 or seen == {"stop", "length"}:
            break
    if temperature > 0:
        assert seen == {"stop", "length"}, seen  # both kinds of ending were exercised


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9), (0.0, 1.0)])
def test_decode_window_lagged_stop_check(hf_and_ours, monkeypatch, temperature, top_p):
    """The Python-loop window with the stop flag read one step late (CUDA's default): the extra step
    after a stop token is discarded, and the outputs are those of one step per schedule."""
    from reasonrl.engine.runner import Runner
    _, model = hf_and_ours
    prompts = random_prompts(5, 1, 14)
    eos = torch.randint(0, V, (3,)).tolist()
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=37, seed=7, stop_token_ids=(eos[0],))
    ref = LLMEngine(model, block_size=4, eos_token_ids=eos[1:], decode_window=1).generate(prompts, params, n=8)
    monkeypatch.setattr(Runner, "decode_window", lambda self, *a: None)  # no C++ window: the Python loop
    eng = LLMEngine(model, block_size=4, eos_token_ids=eos[1:], decode_window=16)
    eng.lagged_stop_check = True
    got = eng.generate(prompts, params, n=8)
    for ga, gb in zip(ref, got):
        for a, b in zip(ga, gb):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert torch.equal(torch.tensor(a.logprobs), torch.tensor(b.logprobs))
    assert eng.bm.num_free == eng.bm.num_blocks
    eng.bm.check([])
    stops = sum(c.finish_reason == "stop" for g in got for c in g)
    if temperature > 0:
        assert stops > 0 and eng.stats["discarded_steps"] > 0  # the late read was exercised
    assert eng.stats["discarded_steps"] <= stops


def test_decode_window_under_preemption(hf_and_ours):
    _, model = hf_and_ours
    prompts = random_prompts(8, 5, 12)
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=3)
    roomy = LLMEngine(model, block_size=4, eos_token_ids=[], decode_window=1).generate(prompts, params, n=2)
    eng = LLMEngine(model, block_size=4, eos_token_ids=[], kv_cache_bytes=12 * 2 * 2 * 4 * 2 * 12 * 4)
    tight = eng.generate(prompts, params, n=2)
    assert eng.stats["preemptions"] > 0
    assert [[c.token_ids for c in g] for g in tight] == [[c.token_ids for c in g] for g in roomy]
    eng.bm.check([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_lean_decode_step_is_bitwise_the_model_forward(arch, dtype):
    """The runner's lean decode step (no module calls) gives exactly the model's decode logits with
    PyTorch's ops; the C++ layer call (its own RMSNorm and RoPE loops) the same up to float32
    summation order, as does the model with its fused CPU kernels (models.functional.FUSED)."""
    from decode_case import decode_case

    from reasonrl.engine.decode_forward import lean_decode
    from reasonrl.models import functional as Fn

    model, ids, pos, slots, lens, tables, kv = decode_case(arch, dtype, seed=random.randint(0, 1000))
    B = ids.shape[0]
    caches = [(kv[i, 0], kv[i, 1]) for i in range(2)]
    kv0, kv2 = kv.clone(), kv.clone()
    caches2 = [(kv2[i, 0], kv2[i, 1]) for i in range(2)]
    lean = lean_decode(model)
    assert lean is not None
    with torch.inference_mode():
        ctx = AttnContext(cu_seqlens=torch.arange(B + 1, dtype=torch.int32), max_seqlen=1, is_prefill=False,
                          slot_mapping=slots, block_tables=tables, context_lens=lens, kv_caches=caches)
        Fn.FUSED["cpu"] = False
        try:
            ref = model.compute_logits(model(ids, pos, ctx))
        finally:
            Fn.FUSED["cpu"] = True
        kv_ref = kv.clone()
        kv.copy_(kv0)
        fused_model = model.compute_logits(model(ids, pos, ctx))
        tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype] * ref.abs().max().item()
        assert (fused_model.float() - ref.float()).abs().max().item() < tol
        assert (kv.float() - kv_ref.float()).abs().max().item() < tol
        kv.copy_(kv_ref)
        stack, threads = lean.stack, torch.get_num_threads()
        # the Python ops; one C++ call per layer; one call for all layers (decode_layers_fwd), its rows
        # whole or split in 2 or 4 ranges run on 2 threads (B = 9: uneven ranges)
        modes = [(False, None, 1)] + ([(True, None, 1)] + [(True, stack, c) for c in (1, 2, 4)] if lean.fused else [])
        for fused, stk, chunks in modes:
            lean.fused, lean.stack, lean.chunks = fused, stk, lambda rows, c=chunks: c
            kv2.copy_(kv0)
            torch.set_num_threads(2 if chunks > 1 else threads)
            try:
                got = lean(ids, pos, slots, lens, tables, caches2)
            finally:
                torch.set_num_threads(threads)
            if not fused:
                assert torch.equal(got, ref) and torch.equal(kv2, kv)
            else:  # one rounding of the activations' dtype, at most, where a sum of squares differs
                assert (got.float() - ref.float()).abs().max().item() < tol
                assert (kv2.float() - kv.float()).abs().max().item() < tol
    from reasonrl.ops import _backend
    assert lean_decode(model).fused == _backend.cpp_available()
    assert (lean_decode(model).stack is not None) == _backend.cpp_available()


@pytest.mark.parametrize("dtype,threads", [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 2)])
def test_cpp_decode_window_equals_python_steps(hf_and_ours, dtype, threads, monkeypatch):
    """On CPU a decode window runs in one C++ call (decode_window_fwd: slots, RoPE, layers, LM head and
    the sampler per step). Same tokens, log-probs, finish reasons and step counts as the Python loop
    over Runner.decode_step and Sampler: sampling, greedy, early stops at stop ids, and the rows split
    over 2 threads."""
    from reasonrl.engine.decode_forward import lean_decode
    from reasonrl.engine.runner import Runner
    from reasonrl.ops import _backend

    if not _backend.cpp_available():
        pytest.skip("reasonrl._C not built")
    _, model = hf_and_ours
    model = model.to(dtype)
    try:
        assert lean_decode(model).windows
        prompts = random_prompts(6, 1, 14)
        eos = torch.randint(0, V, (2,)).tolist()
        calls, cpp = [], Runner.decode_window

        def counted(self, *a):
            out = cpp(self, *a)
            calls.append(out is not None)
            return out

        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for temperature in (1.0, 0.7, 0.0):
                params = SamplingParams(temperature=temperature, max_tokens=29, seed=11, stop_token_ids=(eos[0],))
                outs, stats = [], []
                for f in (counted, lambda self, *a: None):
                    monkeypatch.setattr(Runner, "decode_window", f)
                    eng = LLMEngine(model, block_size=5, eos_token_ids=eos[1:])
                    outs.append(eng.generate(prompts, params, n=6))
                    stats.append(eng.stats["steps"])
                    eng.bm.check([])
                assert calls and all(calls)  # the C++ window ran
                calls.clear()
                for ga, gb in zip(*outs):
                    for a, b in zip(ga, gb):
                        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
                        assert torch.equal(torch.tensor(a.logprobs), torch.tensor(b.logprobs))
                assert stats[0] == stats[1]
                if temperature > 0:
                    assert {c.finish_reason for g in outs[0] for c in g} == {"stop", "length"}
        finally:
            torch.set_num_threads(n)
    finally:
        model.float()


def test_cpp_decode_window_errors():
    from reasonrl.ops import _backend

    if not _backend.cpp_available():
        pytest.skip("reasonrl._C not built")
    model = init_model(builtin_path("tiny"), seed=0)
    from reasonrl.engine.decode_forward import lean_decode
    lean = lean_decode(model)
    w, nh, eps, scale = lean.stack
    kv = torch.zeros(4, 2, 8, 16, 4, 32)
    caches = [(kv[i, 0], kv[i, 1]) for i in range(4)]
    ids, pos, tables = torch.tensor([5, 6]), torch.tensor([3, 4]), torch.zeros(2, 2, dtype=torch.int32)

    def call(**kw):
        a = dict(ids=ids, pos=pos, tables=tables, temperature=1.0, u=torch.rand(2, 4), k=4)
        a.update(kw)
        with torch.inference_mode():
            return torch.ops.reasonrl.decode_window_fwd(
                a["ids"], a["pos"], a["tables"], 16, model.model.embed_tokens.weight, model.rotary.inv_freq, 1.0, w,
                [k for k, _ in caches], [v for _, v in caches], nh, eps, scale, 1, model.model.norm.weight,
                model.lm_head_weight, eps, a["temperature"], a["u"], None, a["k"])

    toks, lps = call()
    assert toks.shape == (2, 4) and lps.shape == (2, 4) and bool((lps <= 0).all())
    for t in (-1.0, 1e-39):
        with pytest.raises(RuntimeError, match="temperature must be 0 .greedy. or a finite number >= 1e-05"):
            call(temperature=t)
    with pytest.raises(RuntimeError, match=r"sampling needs u \(B, >= k\) float32"):
        call(u=None)
    with pytest.raises(RuntimeError, match=r"sampling needs u"):
        call(u=torch.rand(2, 3))
    with pytest.raises(RuntimeError, match="ids and pos must be"):
        call(ids=ids.int())
    with pytest.raises(RuntimeError, match="block_tables must be"):
        call(tables=tables.long())
    with pytest.raises(RuntimeError, match="k and block_size must be >= 1"):
        call(k=0)


def test_generate_refuses_prompts_past_the_model_context(hf_and_ours):
    _, model = hf_and_ours  # max_position_embeddings=256
    eng = LLMEngine(model, block_size=4, eos_token_ids=[])
    ok = eng.generate([[1] * 250], SamplingParams(temperature=0.0, max_tokens=6))  # exactly 256: fine
    assert ok[0][0].length == 6
    cases = [([[1, 2], [1] * 250], 7, r"prompt 1 has 250 tokens and max_tokens is 7: 257 tokens"),
             ([[1] * 300], 1, "prompt 0 has 300 tokens"),
             ([[1, 2, 3]], 100_000_000, "max_tokens is 100000000")]  # was: tried to allocate 409 GB
    for prompts, max_tokens, msg in cases:
        with pytest.raises(ValueError, match=msg + r".*max_position_embeddings=256"):
            eng.generate(prompts, SamplingParams(max_tokens=max_tokens))


def test_generate_prompt_and_argument_types(hf_and_ours):
    import numpy as np

    _, model = hf_and_ours
    eng = LLMEngine(model, block_size=4, eos_token_ids=[])
    p = SamplingParams(temperature=0.0, max_tokens=3)
    ref = eng.generate([[1, 2, 3]], p)[0][0].token_ids
    for same in (torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3], dtype=torch.int32), np.array([1, 2, 3]),
                 (1, 2, 3), [np.int64(1), 2, 3]):
        assert eng.generate([same], p)[0][0].token_ids == ref
    for bad, msg in [([[1.7, 2.2]], r"prompt 0 must hold int token ids, got 1\.7"),  # was silently [1, 2]
                     ([[1, 2], [True, False]], "prompt 1 must hold int token ids, got True"),
                     ([torch.tensor([1.0, 2.0])], "prompt 0 must be a 1-D integer tensor"),
                     ([torch.tensor([[1, 2]])], "prompt 0 must be a 1-D integer tensor"),
                     ("hello", "generate_text"), (["hello"], "generate_text"),  # was "invalid literal for int()"
                     ([["a", "b"]], "generate_text")]:
        with pytest.raises(TypeError, match=msg):
            eng.generate(bad, p)
    for n in (2.5, True, "2"):
        with pytest.raises(TypeError, match="n .*must be an int"):
            eng.generate([[1, 2]], p, n=n)
    with pytest.raises(TypeError, match="params must be a SamplingParams"):  # was AttributeError
        eng.generate([[1, 2]], {"temperature": 0.0})


@pytest.mark.parametrize("kw,err,msg", [
    (dict(max_tokens=2.5), TypeError, "max_tokens must be an int"),
    (dict(max_tokens="4"), TypeError, "max_tokens must be an int"),
    (dict(max_tokens=True), TypeError, "max_tokens must be an int"),
    (dict(top_k=2.5), TypeError, "top_k must be an int"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=-0.5), ValueError, "temperature must be 0 .greedy. or >= 1e-05"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(min_p="0.1"), TypeError, "min_p must be a real number"),
    (dict(seed="abc"), TypeError, "seed must be an int"),
    (dict(think_budget=1.5), TypeError, "think_budget must be an int"),
    (dict(ignore_eos="yes"), TypeError, "ignore_eos must be a bool"),
    (dict(stop_token_ids=(1.5,)), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=("a",)), TypeError, "stop_token_ids"),
    (dict(stop_strings=("",)), ValueError, "empty string"),  # was: stopped after 1 token
    (dict(stop_strings=("ab", 3)), TypeError, "stop_strings"),
])
def test_sampling_params_checks_types(kw, err, msg):
    with pytest.raises(err, match=msg):
        SamplingParams(**kw)


def test_sampling_params_one_stop_string_or_id():
    p = SamplingParams(temperature=1, top_p=1, max_tokens=4, seed=7)  # ints for the float fields are fine
    assert isinstance(p.temperature, float) and p.max_tokens == 4
    assert SamplingParams(stop_strings="ab").stop_strings == ("ab",)  # was split into ("a", "b")
    assert SamplingParams(stop_strings=["ab", "c"]).stop_strings == ("ab", "c")
    assert SamplingParams(stop_token_ids=5).stop_token_ids == (5,)
    assert SamplingParams(stop_token_ids=[5, 6]).stop_token_ids == (5, 6)


def test_stop_string_given_as_a_str_stops_on_the_whole_string(tok):
    # The scripted model says "bdab...": stop_strings="ab" must run past the lone "b" (it was split into "a", "b").
    model = scripted(tok, [("c", "b"), ("b", "d"), ("d", "a"), ("a", "b")], "e")
    eng = LLMEngine(model, tokenizer=tok, block_size=4)
    prompt = tok.encode("c", add_special_tokens=False)
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, stop_strings="ab"))[0][0]
    assert out.finish_reason == "stop" and out.length == 4 and out.text == "bd"


def test_stop_string_of_multibyte_characters():
    """A byte-level tokenizer spells one emoji with 4 tokens: the stop check decoded len(stop) + 2
    tokens (3), never saw it, and ran to max_tokens (while the text was cut at it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={"<eos>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    btok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    emoji = btok.encode("\U0001F600", add_special_tokens=False)
    x, y = (btok.encode(c, add_special_tokens=False)[0] for c in "xy")
    assert len(emoji) == 4
    chain = [x, *emoji, y]
    model = ScriptedModel(len(btok), {a: b for a, b in zip(chain, chain[1:])} | {y: y})
    eng = LLMEngine(model, tokenizer=btok)
    for stop, n in (("\U0001F600", 4), ("\U0001F600y", 5)):
        c = eng.generate([[x]], SamplingParams(temperature=0, max_tokens=12, stop_strings=[stop]))[0][0]
        assert (c.finish_reason, c.length, c.text) == ("stop", n, ""), stop


@pytest.mark.parametrize("prompt", ["q?<think>", "q?<think>\n", "q?<think>Let me", "q?<think>a</think>b<think>"])
def test_think_budget_when_the_prompt_opened_thinking(tok, prompt):
    """The budget held only for prompts that END with "<think>"; R1-style templates end "<think>\n"."""
    model = scripted(tok, [("</think>", "x"), ("x", "<eos>")], "a")
    eng = LLMEngine(model, tokenizer=tok, block_size=4)
    c = eng.generate([tok.encode(prompt, add_special_tokens=False)],
                     SamplingParams(temperature=0, max_tokens=40, think_budget=3))[0][0]
    assert c.text == "aaa</think>x", prompt
    c = eng.generate([tok.encode("q?<think>a</think>b", add_special_tokens=False)],
                     SamplingParams(temperature=0, max_tokens=10, think_budget=3))[0][0]
    assert c.text == "a" * 10  # closed in the prompt: nothing forced


def test_opens_think():
    from reasonrl.engine.llm_engine import opens_think
    s, e = [1, 2], [3, 2]
    assert opens_think([9, 1, 2], s, e) and opens_think([1, 2, 7, 7], s, e) and opens_think([1, 2, 3, 2, 1, 2, 5], s, e)
    assert not opens_think([1, 2, 3, 2], s, e) and not opens_think([9, 9], s, e) and not opens_think([], s, e)


def test_generate_text_refuses_one_str(tok):
    eng = LLMEngine(scripted(tok, [], "a"), tokenizer=tok)
    with pytest.raises(TypeError, match="one str"):  # was: one prompt per character
        eng.generate_text("12*3=", SamplingParams(temperature=0, max_tokens=2))
    assert len(eng.generate_text(["12*3="], SamplingParams(temperature=0, max_tokens=2))) == 1


def test_default_eos_is_the_tokenizers_and_the_configs(tok):
    model = scripted(tok, [], "a")
    model.config.eos_token_id = [5, 7]
    assert LLMEngine(model, tokenizer=tok).eos_token_ids == {tok.eos_token_id, 5, 7}
    assert LLMEngine(model).eos_token_ids == {5, 7}
    assert LLMEngine(model, tokenizer=tok, eos_token_ids=[9]).eos_token_ids == {9}  # given: only those


@pytest.mark.parametrize("t", [1e-6, 1e-40, 5e-324])
def test_tiny_temperatures_refused(t):
    """1e-40 overflowed logits / t to inf (an index error from the sampler), 5e-324 rounds to 0 in float32
    and sampled at temperature 1."""
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or >= 1e-05"):
        SamplingParams(temperature=t)
    assert SamplingParams(temperature=1e-5).temperature == 1e-5


def test_sampling_params_checked_again_at_generate(tok):
    sp = SamplingParams(temperature=1.0, max_tokens=3)
    sp.temperature = float("nan")  # set after construction: skipped the checks, NaN log-probs
    with pytest.raises(ValueError, match="temperature must be finite"):
        LLMEngine(scripted(tok, [], "a"), tokenizer=tok).generate([[5, 6]], sp)


def test_dynamic_rope_seeded_sample_independent_of_the_batch():
    """Dynamic NTK took the batch's longest position for every row: a short prompt's seeded sample
    changed when a long one shared its batch."""
    from reasonrl.models import ModelConfig, init_model
    cfg = ModelConfig(arch="llama", max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    g = torch.Generator().manual_seed(0)
    short, long = (torch.randint(3, 80, (n,), generator=g).tolist() for n in (6, 100))
    for seed in range(3):
        model = init_model(cfg, seed=seed).eval()
        sp = SamplingParams(temperature=1, max_tokens=24, seed=seed)
        alone = LLMEngine(model, eos_token_ids=[]).generate([short], sp)[0][0]
        batched = LLMEngine(model, eos_token_ids=[]).generate([short, long], sp)[0][0]
        assert alone.token_ids == batched.token_ids and alone.logprobs == pytest.approx(batched.logprobs, abs=1e-5)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(kv_cache_bytes=-5), ValueError, "kv_cache_bytes must be a positive int"),  # was accepted
    (dict(kv_cache_bytes=0), ValueError, "kv_cache_bytes must be a positive int"),
    (dict(kv_cache_bytes=1.5e9), ValueError, "kv_cache_bytes must be a positive int"),
    (dict(kv_cache_bytes="2GB"), ValueError, "kv_cache_bytes must be a positive int"),
    (dict(block_size="16"), TypeError, "block_size must be an int"),
    (dict(max_num_seqs=2.5), TypeError, "max_num_seqs must be an int"),
    (dict(eos_token_ids="x"), ValueError, "eos_token_ids"),
    (dict(eos_token_ids=[2, 1.5]), ValueError, "eos_token_ids"),
])
def test_engine_init_checks_arguments(hf_and_ours, kw, err, msg):
    _, model = hf_and_ours
    with pytest.raises(err, match=msg):
        LLMEngine(model, **kw)
    LLMEngine(model, kv_cache_bytes=1 << 20, eos_token_ids=[2, 3])


# ---- the Triton sampler (kernels/sample.py): the GPU path of all-sampling batches ------------------------
def _kernel_and_torch(logits, temp, u):
    from reasonrl.engine.sampler import Sampler

    B = logits.shape[0]
    ones = torch.ones(B, device=logits.device)
    args = (logits, temp, torch.zeros(B, dtype=torch.int64, device=logits.device), ones, ones * 0)
    s = Sampler()
    s.kernel = True
    got = s(*args, u=u, any_filter=False, any_greedy=False)
    s.kernel = False
    ref = s(*args, u=u, any_filter=False, any_greedy=False)
    return got, ref


def _masked_rows(logits, g):
    """Rows that stress the sampler's ends: every other token masked; a masked tail (the last 100
    columns, or half the row); the last 4096-column segment masked whole (where V allows); one token left."""
    B, V = logits.shape
    logits[0, ::2] = float("-inf")
    logits[1, -min(100, V // 2):] = float("-inf")
    if V > 4096:
        logits[2, (V - 1) // 4096 * 4096:] = float("-inf")
    logits[-1, 1:] = float("-inf")
    u = torch.rand(B, generator=g)
    u[0], u[1], u[2] = 0.0, 1.0 - 2**-24, 1.0 - 2**-24  # torch.rand's ends
    return u


@pytest.mark.parametrize("V,B,dtype", [(50, 33, torch.float32), (4096, 4, torch.float32), (4097, 5, torch.float16),
                                       (12288, 6, torch.float32), (151936, 6, torch.bfloat16)])
def test_sampler_kernel_draws_as_the_torch_path(V, B, dtype):
    """The same uniforms give the same tokens (a draw within float rounding of a CDF step could differ;
    none does at random uniforms here) and the same log-probs up to float32 rounding; -inf logits (a
    masked vocabulary, a masked tail, a whole masked segment) are never drawn, also at u = 1 - 2^-24,
    where the last tokens' probabilities lie below the CDF's rounding and any positive one is a draw."""
    from reasonrl.ops._backend import triton_importable
    if not triton_importable() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without REASONRL_GPU_TESTS)")
    g = torch.Generator().manual_seed(V)
    logits = (3 * torch.randn(B, V, generator=g)).to(dtype)
    u = _masked_rows(logits, g)
    temp = torch.rand(B, generator=g) + 0.3
    (tok, lp), (rt, rl) = _kernel_and_torch(logits, temp, u)
    assert torch.equal(tok[3:], rt[3:]) and tok[0] == rt[0]
    assert torch.isfinite(logits[torch.arange(B), tok].float()).all() and tok[-1] == 0
    assert torch.isfinite(lp).all()
    same = tok == rt
    torch.testing.assert_close(lp[same], rl[same], rtol=0, atol=5e-5)


@pytest.mark.gpu
def test_gpu_sampler_kernel_draws_as_the_torch_path():
    """On the GPU at the rollout anchor's shape (64 rows, Qwen2's vocabulary, bf16 logits)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from reasonrl.engine.sampler import Sampler
    from reasonrl.kernels.sample import sample_rows

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 151936, generator=g)).bfloat16()
    u = _masked_rows(logits, g)
    temp = torch.rand(64, generator=g) + 0.3
    logits, temp, u = logits.cuda(), temp.cuda(), u.cuda()
    tok, lp = sample_rows(logits, temp, u)  # the kernel itself (not through Sampler's routing)
    s = Sampler()
    s.kernel = False
    ones = torch.ones(64, device="cuda")
    rt, rl = s(logits, temp, torch.zeros(64, dtype=torch.int64, device="cuda"), ones, ones * 0, u=u,
               any_filter=False, any_greedy=False)
    same = (tok == rt)[3:]
    assert same.sum() >= 60, f"{int((~same).sum())} of 61 draws at random uniforms differ"
    assert torch.isfinite(logits[torch.arange(64, device="cuda"), tok].float()).all() and torch.isfinite(lp).all()
    torch.testing.assert_close(lp[3:][same], rl[3:][same], rtol=0, atol=1e-4)
    s.kernel = "auto"  # and the engine's sampler routes such a batch to it
    assert s._use_kernel(logits, u, None, True, False, False)



@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_tokens=8, seed=0),
                                    SamplingParams(temperature=0.0, max_tokens=8),
                                    SamplingParams(temperature=1.0, top_k=5, max_tokens=8, seed=0)],
                         ids=["sample", "greedy", "top_k"])
@pytest.mark.parametrize("when", ["prefill", "decode_window", "single_steps"])
def test_nan_logits_raise_a_clear_error(params, when, monkeypatch):
    """NaN logits (a diverged model) gave an index error from the sampler's gather, or, greedy, NaN
    log-probs and tokens drawn from garbage without a word (2026-11-30); now FloatingPointError names the
    prompt and the token, from the first token's sampler, a C++ or Python decode window, or single steps."""
    from reasonrl.engine.runner import Runner

    model = init_model(builtin_path("tiny"), seed=0)
    if when == "prefill":
        with torch.no_grad():
            model.model.embed_tokens.weight[5:9] = float("nan")  # tied: those logits NaN from the first token
    else:  # the K/V cache poisoned after prefill: every decode step's attention reads NaN
        for name in ("decode_window", "decode_step", "decode"):
            orig = getattr(Runner, name)

            def poisoned(self, *a, _orig=orig, **kw):
                self.kv.fill_(float("nan"))
                return _orig(self, *a, **kw)
            monkeypatch.setattr(Runner, name, poisoned)
    eng = LLMEngine(model, eos_token_ids=[], max_num_seqs=8, decode_window=1 if when == "single_steps" else 16)
    with pytest.raises(FloatingPointError, match=r"distribution is NaN .* prompt 0 sample 0 at completion token "
                                                 + ("0" if when == "prefill" else "1")):
        eng.generate([[1, 2, 3]] * 3, params)


@pytest.mark.parametrize("path", ["kernel", "torch", "torch_chunked"])
def test_sampler_rows_without_a_finite_logit_give_nan_not_a_bad_index(path):
    """A row of all -inf or NaN logits: the Triton sampler returned token -1 and read the element before
    the row; the torch path raised an index error from its gather (2026-11-30). Now every path gives a
    token in range and a NaN log-prob (which the engine reports), and the other rows draw as before."""
    from reasonrl.engine.sampler import Sampler

    V = 9000 if path == "torch_chunked" else 40  # > 8 * 1024: the two-level inverse CDF
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g)
    logits[0] = float("-inf")
    logits[1] = float("nan")
    temp, u = torch.ones(3), torch.rand(3, generator=g)
    if path == "kernel":  # (on the CPU through the interpreter: tests/conftest.py sets TRITON_INTERPRET=1)
        from reasonrl.kernels.sample import sample_rows
        tok, lp = sample_rows(logits, temp, u)
    else:
        s = Sampler()
        s.kernel = False
        ones = torch.ones(3)
        tok, lp = s(logits, temp, torch.zeros(3, dtype=torch.int64), ones, ones * 0, u=u, any_filter=False,
                    any_greedy=False)
    assert ((tok >= 0) & (tok < V)).all(), tok
    assert lp[:2].isnan().all() and torch.isfinite(lp[2])
