"""Shared-prefix packing in training (AttnContext.prefix_of, train.common.pack_shared): a GRPO group's
prompt packed once must give the hidden states and gradients of packing prompt+completion G times."""
import dataclasses

import pytest
import torch

import reasonrl.models.attention as attn
from reasonrl.models import AttnContext, ModelConfig, builtin_path, init_model
from reasonrl.ops.grpo import GRPOLossConfig
from reasonrl.train.common import pack, pack_shared
from reasonrl.train.config import GRPOConfig
from reasonrl.train.grpo import train_on_groups

pytestmark = pytest.mark.usefixtures("one_thread")

CFGS = {
    "llama-gqa": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(arch="qwen3", num_attention_heads=4, num_key_value_heads=1),
    "qwen2-bias": dict(arch="qwen2", num_attention_heads=2, num_key_value_heads=2, attention_bias=True),
    "qwen3-moe": dict(arch="qwen3_moe", num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=24),
}


def model_for(name, seed=0):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8,
                      tie_word_embeddings=False, **CFGS[name])
    return init_model(cfg, seed=seed).double()


def groups(G, prompt_lens, resp_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i, p in enumerate(prompt_lens):
        head = torch.randint(1, 40, (p,), generator=g).tolist()
        for j in range(G):
            prompts.append(head)
            responses.append(torch.randint(1, 40, (resp_lens[(i * G + j) % len(resp_lens)],), generator=g).tolist())
    return prompts, responses


def rows_out(model, packed, weights):
    """Hidden rows predicting each response token (B, T, H), and the gradients of a fixed linear
    function of them."""
    ids, pos, ctx, rows = packed
    model.zero_grad()
    h = model(ids, pos, ctx)[rows]
    (h * weights).sum().backward()
    return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def shared_equals_pack(model, prompts, responses, G):
    """pack_shared against pack(): the rows predicting each response token and the gradients of a
    fixed linear function of them. Returns pack_shared's output."""
    B, T = len(responses), max(len(r) for r in responses)
    mask = torch.tensor([[t < len(r) for t in range(T)] for r in responses], dtype=torch.float64)
    w = torch.randn(B, T, model.config.hidden_size, dtype=torch.float64) * mask[..., None]
    ids, pos, ctx, _, rows = pack(prompts, responses)
    ref_h, ref_g = rows_out(model, (ids, pos, ctx, rows), w)
    shared = pack_shared(prompts, responses, G)
    h, grads = rows_out(model, shared, w)
    assert (h - ref_h).mul(mask[..., None]).abs().max().item() < 1e-12
    assert ref_g.keys() == grads.keys()
    for n in ref_g:  # RMSNorm runs in float32 (as in transformers), and the prompt's gradient now sums
        # its G contributions in another order: float32 rounding of the largest entry, no more
        assert (grads[n] - ref_g[n]).abs().max().item() < 1e-6 * ref_g[n].abs().max().item(), n
    return shared


@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("G,prompt_lens,resp_lens", [
    (4, [5, 9, 1], [3, 7, 1, 12]),      # ragged prompts and responses; a 1-token prompt and response
    (1, [6, 2], [4]),                   # G = 1
    (8, [16], [20, 18, 19, 20, 17, 20, 19, 18]),  # similar lengths: one padded call
    (3, [4, 30], [1, 40, 2]),           # very ragged
])
def test_shared_prefix_matches_unshared(name, G, prompt_lens, resp_lens):
    prompts, responses = groups(G, prompt_lens, resp_lens)
    shared = shared_equals_pack(model_for(name), prompts, responses, G)
    assert shared[0].numel() == sum(prompt_lens) + sum(len(r) for r in responses)


@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("template,G,rest_lens,resp_lens", [
    (20, 3, [1, 4, 7], [3, 6, 1, 9]),      # a 1-token rest; ragged responses
    (16, 2, [5, 5, 5, 5], [8]),            # COMMON_PREFIX_MIN exactly; equal lengths
    (40, 1, [2, 30], [1, 12]),             # G = 1; very ragged
])
def test_common_template_packed_once(name, template, G, rest_lens, resp_lens):
    """Prompts that start with the same tokens (a chat template): those are packed once in front
    and every prompt's rest continues them (a chain of prefixes): same rows and gradients as pack()."""
    head = torch.randint(1, 40, (template,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts, responses = groups(G, rest_lens, resp_lens)
    shared = shared_equals_pack(model_for(name), [head + p for p in prompts], responses, G)
    assert shared[0].numel() == template + sum(rest_lens) + sum(len(r) for r in responses)
    assert shared[2].prefix_of[:1 + len(rest_lens)] == [-1] + [0] * len(rest_lens)


def test_common_template_below_the_minimum_is_not_split():
    from reasonrl.train.common import COMMON_PREFIX_MIN
    prompts, responses = groups(2, [3, 4], [2])
    head = list(range(1, COMMON_PREFIX_MIN))  # one token short
    _, _, ctx, _ = pack_shared([head + p for p in prompts], responses, 2)
    assert ctx.prefix_of == [-1, -1, 0, 0, 1, 1]


def test_chunked_and_reordered_paths(monkeypatch):
    """Continuations split over several SDPA calls (a small mask budget), roots not packed first."""
    model = model_for("llama-gqa")
    prompts, responses = groups(2, [3, 7, 5], [6, 2, 9])
    ids, pos, ctx, _, rows = pack(prompts, responses)
    with torch.no_grad():
        ref = model(ids, pos, ctx)[rows]
    ids, pos, ctx, rows = pack_shared(prompts, responses, 2)
    monkeypatch.setattr(attn, "MASK_BUDGET", 100)
    with torch.no_grad():
        assert (model(ids, pos, ctx)[rows] - ref).abs().max().item() < 1e-12
    # the same sequences with the continuations first: prefix_of is by index, not by layout
    lens = ctx.cu_seqlens.diff().tolist()
    n_roots = 3
    order = list(range(n_roots, len(lens))) + list(range(n_roots))
    seq_ids, seq_pos = ids.split(lens), pos.split(lens)
    new_index = {old: new for new, old in enumerate(order)}
    ctx2 = AttnContext.from_lengths([lens[o] for o in order],
                                    prefix_of=[new_index[ctx.prefix_of[o]] if ctx.prefix_of[o] >= 0 else -1 for o in order])
    starts = torch.tensor([0] + lens).cumsum(0)
    starts2 = torch.tensor([0] + [lens[o] for o in order]).cumsum(0)
    remap = torch.empty(len(ids), dtype=torch.long)
    for new, old in enumerate(order):
        remap[starts[old]:starts[old] + lens[old]] = torch.arange(starts2[new], starts2[new] + lens[old])
    with torch.no_grad():
        h2 = model(torch.cat([seq_ids[o] for o in order]), torch.cat([seq_pos[o] for o in order]), ctx2)
    assert (h2[remap[rows]] - ref).abs().max().item() < 1e-12


def test_ragged_continuations_pad_at_most_2x():
    """Very ragged completions are sorted by length and split so that the batched calls spend at most
    twice the unpadded attention work (queries x keys), and every real row comes back once."""
    lengths = [5, 3] + [1, 200, 2, 180, 3, 190, 1, 150]  # two prompts, then 4 continuations each
    prefix_of = [-1, -1] + [0, 0, 0, 0, 1, 1, 1, 1]
    plan = attn.shared_prefix_plan(lengths, prefix_of, "cpu", flash=False)
    klens = plan["lengths_k"]
    unpadded = sum(lengths[b] * klens[b] for b in range(2, len(lengths)))
    padded = sum(Bc * Lq * Lk for *_, Bc, Lq, Lk in plan["conts"])
    assert len(plan["conts"]) >= 2 and plan["inv"] is not None  # sorted, then split
    assert padded <= 2 * unpadded
    assert sum(c[3].numel() for c in plan["conts"]) == sum(lengths[2:])


def test_shared_prefix_errors():
    model = model_for("llama-gqa")
    ids, pos = torch.arange(6), torch.arange(6)
    for prefix_of, msg in [([-1], "one entry per sequence"), ([-1, 1], "another sequence"),
                           ([1, 0], "cycle"), ([-1, 5], "another sequence")]:
        with pytest.raises(ValueError, match=msg):
            model(ids, pos, AttnContext.from_lengths([3, 3], prefix_of=prefix_of))
    with pytest.raises(ValueError, match="do not share one prompt"):
        pack_shared([[1, 2], [1, 3]], [[4], [5]], 2)
    with pytest.raises(ValueError, match="whole groups"):
        pack_shared([[1, 2]] * 3, [[4]] * 3, 2)


@pytest.mark.parametrize("loss_type,mu", [("dapo", 1), ("grpo", 2)])
@pytest.mark.parametrize("template", [0, 18])
def test_train_on_groups_same_gradients(loss_type, mu, template):
    """One GRPO update with share_prefix on and off: the same loss metrics and gradients (mu = 2 also
    takes the old-policy log-probs through the shared forward). template: the prompts start with the
    same 18 tokens, which micro-batches of several groups pack once more (prefix chains)."""
    cfg_m = dataclasses.replace(ModelConfig.from_json(builtin_path("tiny")), hidden_size=32, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    prompts, responses = groups(4, [6, 11, 3], [5, 9, 2, 14], seed=1)
    prompts = [list(range(40, 40 + template)) + [p % 80 + 3 for p in x] for x in prompts]
    responses = [[t % 80 + 3 for t in x] for x in responses]

    class Comp:
        def __init__(self, ids, i):
            self.token_ids, self.finish_reason = ids, "length" if i % 5 == 0 else "stop"
    gs = [{"prompt": prompts[i * 4], "completions": [Comp(responses[i * 4 + j], i * 4 + j) for j in range(4)],
           "rewards": [float((i + j) % 3) for j in range(4)]} for i in range(3)]

    class Recorder:  # stands in for AdamW: keeps the gradients of each step
        def __init__(self, model):
            self.model, self.grads = model, []

        def step(self):
            self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

        def zero_grad(self, set_to_none=True):
            self.model.zero_grad(set_to_none=set_to_none)

    out = []
    for share in (False, True):
        model = init_model(cfg_m, seed=2).double()
        cfg = GRPOConfig(group_size=4, share_prefix=share, loss_type=loss_type, mu=mu,
                         micro_batch_tokens=40 + 10 * template, backend="reference")
        rec = Recorder(model)
        sums = train_on_groups(model, None, rec, gs, cfg, GRPOLossConfig(loss_type=loss_type, max_completion_length=14))
        out.append((sums, rec.grads))
    (s0, g0), (s1, g1) = out
    for k in ("loss", "kl", "clip_frac", "tokens", "train_tokens"):
        assert s1[k] == pytest.approx(s0[k], rel=1e-6, abs=1e-12), k
    assert len(g0) == len(g1) == mu
    for a, b in zip(g0, g1):
        for n in a:  # float32 RMSNorm, as above
            assert (a[n] - b[n]).abs().max().item() < 1e-6 * a[n].abs().max().item(), n


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3", "llama-gqa"])
def test_cuda_shared_prefix_matches_unshared(name):
    """On CUDA: fp32 (the SDPA path) and bf16 autocast (flash-attn's varlen kernel when installed, with
    its bottom-right causal alignment) against the unshared float64 forward on the CPU."""
    model = model_for(name)
    prompts, responses = groups(4, [37, 5, 90], [1, 60, 17, 33])
    prompts = [list(range(1, 21)) + p for p in prompts]  # a common template: a chain of prefixes
    ids, pos, ctx, _, rows = pack(prompts, responses)
    B, T = rows.shape
    mask = torch.tensor([[t < len(r) for t in range(T)] for r in responses])
    w = torch.randn(B, T, model.config.hidden_size, dtype=torch.float64) * mask[..., None]
    ref_h, ref_g = rows_out(model, (ids, pos, ctx, rows), w)
    ids, pos, ctx, rows = pack_shared(prompts, responses, 4, device="cuda")
    model = model.float().cuda()
    for autocast, tol in ((False, 1e-3), (True, 5e-2)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            h, grads = rows_out(model, (ids.cuda(), pos.cuda(), ctx, rows), w.float().cuda())
        scale = ref_h.abs().max().item()
        assert (h.double().cpu() - ref_h)[mask].abs().max().item() < tol * scale
        for n in ref_g:
            assert (grads[n].double().cpu() - ref_g[n]).abs().max().item() < tol * 5 * ref_g[n].abs().max().item(), n


@pytest.mark.parametrize("template", [0, 20])
def test_pack_sft_rows_and_targets(template):
    """pack_sft: hidden[rows] predicts targets, the response tokens in order; with a common template
    (packed once) the log-likelihood and its gradients equal plain pack()'s."""
    from reasonrl.ops import linear_token_logprobs
    from reasonrl.train.common import pack_sft
    model = model_for("qwen3")
    prompts, responses = groups(1, [4, 9, 2], [5, 1, 7])
    prompts = [list(range(1, 1 + template)) + p for p in prompts]

    def nll(packed_rows_targets):
        ids, pos, ctx, rows, targets = packed_rows_targets
        model.zero_grad()
        loss = -linear_token_logprobs(model(ids, pos, ctx)[rows], model.lm_head_weight, targets,
                                      backend="reference").sum()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed = pack_sft(prompts, responses)
    assert packed[4].tolist() == [t for r in responses for t in r]
    assert (packed[2].prefix_of is not None) == (template > 0)  # the template packed once
    ids, pos, ctx, targets, _ = pack(prompts, responses)
    live = (targets != -100).nonzero().squeeze(1)
    (l0, g0), (l1, g1) = nll((ids, pos, ctx, live, targets[live])), nll(packed)
    assert abs(l0 - l1) < 1e-10 * abs(l0)
    for n in g0:
        assert (g0[n] - g1[n]).abs().max().item() < 1e-6 * g0[n].abs().max().item(), n


def test_micro_batches_count_a_common_template_once():
    """The token budget of a micro-batch holds what pack_shared packs: a template common to every prompt
    once per forward, each group's prompt rest once, every completion. 4 groups of 2, a 40-token
    template, 5-token rests, 10-token completions, budget 90: two groups per forward (each 90 tokens);
    counting the template per group would give one group per forward."""
    from reasonrl.train.grpo import train_on_groups
    cfg_m = dataclasses.replace(ModelConfig.from_json(builtin_path("tiny")), hidden_size=32, intermediate_size=48,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = init_model(cfg_m, seed=0)
    template = list(range(3, 43))

    class Comp:
        def __init__(self, ids):
            self.token_ids, self.finish_reason = ids, "stop"
    gs = [{"prompt": template + [50 + i] * 5, "completions": [Comp([60 + i + j] * 10) for j in range(2)],
           "rewards": [0.0, 1.0]} for i in range(4)]
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].numel()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for budget, want in ((90, [90, 90]), (89, [65] * 4), (1 << 20, [40 + 4 * 5 + 8 * 10])):
        sizes.clear()
        cfg = GRPOConfig(group_size=2, micro_batch_tokens=budget, backend="reference")
        train_on_groups(model, None, opt, gs, cfg, GRPOLossConfig(loss_type="dapo", max_completion_length=10))
        assert sizes == want, (budget, sizes)
    hook.remove()
