"""grpo_loss: every backend against the float64 reference (values, metrics, gradients), the numerics
cases, argument errors, and agreement with TRL's loss as its documentation writes it."""
import itertools

import math

import pytest
import torch

from reasonrl.ops import _backend
from reasonrl.ops.grpo import (GRPOLossConfig, grpo_loss, grpo_loss_from_logprobs,
                               grpo_loss_from_logprobs_reference, grpo_loss_reference)
from tolerance import assert_close_to_ref

CPU_BACKENDS = [b for b in ("cpp", "triton") if _backend.why_unavailable(b, torch.device("cpu")) is None]

# ---- options: the full product for the compiled backends, a pairwise cover for Triton (interpreter)
OPTIONS = dict(
    advantage=("grpo", "dr_grpo", "rloo"),
    loss_type=("dapo", "grpo", "bnpo", "dr_grpo"),
    importance_sampling=("token", "sequence"),
    dual_clip=(None, 1.5),
    beta=(0.0, 0.1),
    entropy_coef=(0.0, 0.1),
    on_policy=(False, True),
)
ALL_COMBOS = [dict(zip(OPTIONS, v)) for v in itertools.product(*OPTIONS.values())]


def pairwise_cover(options):
    """A small list of combinations that holds every pair of option values at least once (greedy)."""
    keys = list(options)
    todo = {(a, va, b, vb) for a, b in itertools.combinations(keys, 2) for va in options[a] for vb in options[b]}
    chosen = []
    while todo:
        best = max(ALL_COMBOS, key=lambda c: sum((a, c[a], b, c[b]) in todo for a, b in itertools.combinations(keys, 2)))
        chosen.append(best)
        todo -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(keys, 2)}
    return chosen


PAIRWISE = pairwise_cover(OPTIONS)


def make_config(c, **kw):
    args = {k: v for k, v in c.items() if k != "on_policy"}
    return GRPOLossConfig(epsilon_low=0.2, epsilon_high=0.28, **args, **kw)


def make_batch(B, T, G, V=None, dtype=torch.float32, device="cpu", temperature=1.0):
    """Ragged masks (one row fully masked when B > 1), rewards with some zero-variance groups, old / ref
    log-probs near the policy's so that both clip sides, the dual clip and the KL all engage."""
    lengths = torch.randint(0, T + 1, (B,))
    lengths[0] = T
    if B > 1:
        lengths[1] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) bool
    rewards = torch.randint(0, 3, (B,)).float() * 0.5  # (B,)
    if B // G > 1:
        rewards[:G] = 1.0  # one zero-variance group
    rewards[-G:] = torch.randn(G)  # one group with continuous rewards
    out = dict(mask=mask, rewards=rewards)
    if V is not None:
        out["logits"] = (2 * torch.randn(B, T, V)).to(dtype)  # (B, T, V)
        ids = torch.randint(0, V, (B, T))
        lp = torch.log_softmax(out["logits"].double() / temperature, -1).gather(-1, ids[..., None])[..., 0]
        out["old"], out["ref"] = near(lp, 0.3), near(lp, 0.5)
        ids[~mask] = -7  # padding ids that are not valid: must be ignored
        out["ids"] = ids
    return {k: v.to(device) for k, v in out.items()}


def near(lp, sigma):
    return (lp.double() + sigma * torch.randn_like(lp.double())).float()


def away_from_clip(lp, old, margin=0.05, bounds=(math.log(0.8), math.log(1.28), math.log(1.5))):
    """Move old log-probs so that no token's log-ratio sits within `margin` of a clip boundary.

    The fused form recomputes bf16 logits with its own GEMM blocking; a token whose ratio is that
    close to 1 - eps_low, 1 + eps_high (0.2, 0.28 here) or the dual-clip c can be clipped on one side of the comparison and not on the other, a jump in
    the gradient that no tolerance covers (seen in about 1 seed in 100 before this).
    """
    r = lp.double() - old.double()
    for b in bounds:
        close = (r - b).abs() < margin
        r = torch.where(close, b + torch.where(r >= b, margin, -margin), r)
    return (lp.double() - r).float()


def seq_away_from_clip(lp, old, mask, margin=0.05, bounds=(math.log(0.8), math.log(1.28), math.log(1.5))):
    """GSPO's version: shift each row's old log-probs so that its mean log-ratio over the mask (the
    sequence ratio's log) sits at least `margin` from every clip boundary. Per-token margins do not
    keep the mean away (one bf16 seed in about 1,000 flipped a sequence's clip decision)."""
    m = mask.double()
    cnt = m.sum(1)
    r = (m * (lp.double() - old.double())).sum(1) / cnt.clamp(min=1)  # (B,)
    shift = torch.zeros_like(r)
    for b in bounds:
        close = ((r + shift - b).abs() < margin) & (cnt > 0)
        shift = torch.where(close, b + torch.where(r + shift >= b, margin, -margin) - r, shift)
    return (old.double() - shift[:, None]).float()  # r = lp - old rises by shift


# ---- the GRPO kernels alone (log-probs given), every combination --------------------------------

def run_from_logprobs(backend, c, lp, ent, b, G, up):
    cfg = make_config(c)
    old = None if c["on_policy"] else b["old"]
    lp = lp.detach().clone().requires_grad_(True)
    ent = ent.detach().clone().requires_grad_(True)
    kw = dict(mask=b["mask"], rewards=b["rewards"], group_size=G, old_logprobs=old,
              ref_logprobs=b["ref"], config=cfg)
    if backend == "reference":
        loss, met = grpo_loss_from_logprobs_reference(lp, ent, **kw)
    else:
        loss, met = grpo_loss_from_logprobs(lp, ent, backend=backend, **kw)
    loss.backward(up.to(loss.dtype))
    return loss.detach(), met, lp.grad, ent.grad if ent.grad is not None else torch.zeros_like(ent)


def check_combos(backend, combos, B, T, G, device="cpu"):
    b = make_batch(B, T, G)
    lp = -3 * torch.rand(B, T)  # (B, T) float32 log-probs
    ent = 2 * torch.rand(B, T)
    # no token's ratio within 0.05 (in log) of a clip edge: CUDA's fast-math expf (a few ulp) may
    # decide such a token on the other side than the float32 reference does
    b["old"], b["ref"] = away_from_clip(lp, near(lp, 0.3)), near(lp, 0.5)
    b_seq = {**b, "old": seq_away_from_clip(lp, b["old"], b["mask"])}  # for GSPO's sequence ratios
    b, b_seq = ({k: v.to(device) for k, v in x.items()} for x in (b, b_seq))
    lp, ent = lp.to(device), ent.to(device)
    up = torch.randn(()).to(device)  # one shared upstream gradient
    for c in combos:
        bc = b_seq if c["importance_sampling"] == "sequence" else b
        r64 = run_from_logprobs("reference", c, lp.double(), ent.double(), bc, G, up)
        r32 = run_from_logprobs("reference", c, lp, ent, bc, G, up)
        out = run_from_logprobs(backend, c, lp, ent, bc, G, up)
        for i, name in ((0, "loss"), (2, "grad_logp"), (3, "grad_entropy")):
            assert_close_to_ref(out[i], r64[i], r32[i], torch.float32, f"{backend} {c} {name}")
        assert set(out[1]) == set(r64[1]), f"{c}: metric keys {sorted(out[1])} != {sorted(r64[1])}"
        for k in r64[1]:
            assert out[1][k].dim() == 0 and not out[1][k].requires_grad
            assert_close_to_ref(out[1][k], r64[1][k], r32[1][k], torch.float32, f"{backend} {c} metric {k}")
        masked = ~b["mask"]
        assert (out[2][masked] == 0).all(), f"{c}: masked positions got a gradient"


def check_exact_zero_advantages(backend, device):
    """Rows whose reward equals their group's mean (grpo, dr_grpo) or the mean of the others (rloo) have
    A == 0 exactly, and so count in neither clip fraction: every token below 1 - eps_low and above
    1 + eps_high. The GPU's approximate float32 division once made RLOO's (2 - 0.5) / 3 differ from
    0.5 by an ulp: A = -6e-8 and a whole row counted as clipped low (loss and gradients barely moved)."""
    T = 8
    for G, r in ((3, [0.5, 0.0, 1.0, 1.0, 0.5, 0.0]), (4, [0.5, 0.0, 1.0, 0.5, 1.0, 0.5, 0.5, 0.0])):
        rewards = torch.tensor(r)  # (B,): in each group one row below and one above the mean, the rest at it
        B = rewards.numel()
        lp = torch.full((B, T), -1.0)
        old = lp - torch.tensor([-0.5, 0.5] * (T // 2))  # ratios e^-0.5 (below 0.8) and e^0.5 (above 1.28)
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        for adv in ("grpo", "dr_grpo", "rloo"):
            cfg = GRPOLossConfig(epsilon_low=0.2, epsilon_high=0.28, advantage=adv, loss_type="grpo")
            _, met = grpo_loss_from_logprobs(lp.to(device), mask=mask, rewards=rewards.to(device), group_size=G,
                                             old_logprobs=old.to(device), config=cfg, backend=backend)
            # two rows with A < 0 (T/2 tokens each clipped low), two with A > 0 (T/2 clipped high)
            for k in ("clip_frac_low", "clip_frac_high"):
                n = met[k].item() * B * T  # a wrong row moves it by T / 2
                assert abs(n - 2 * (T // 2)) < 1e-3, f"{backend} G={G} {adv}: {k} counts {n} tokens, not {2 * (T // 2)}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_zero_advantages(backend):
    check_exact_zero_advantages(backend, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_exact_zero_advantages(backend):
    dev = torch.device("cuda")
    if _backend.why_unavailable(backend, dev) is not None:
        pytest.skip(_backend.why_unavailable(backend, dev))
    check_exact_zero_advantages(backend, dev)


@pytest.mark.parametrize("T,G,B", [(1, 2, 4), (37, 4, 12), (37, 16, 32)])
def test_kernels_all_option_combinations_cpp(T, G, B):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    check_combos("cpp", ALL_COMBOS, B, T, G)


@pytest.mark.parametrize("T,G,B", [(1, 2, 4), (37, 4, 8), (37, 16, 16)])
def test_kernels_pairwise_options_triton(T, G, B):
    if "triton" not in CPU_BACKENDS:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    check_combos("triton", PAIRWISE, B, T, G)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_kl_at_small_divergence(backend):
    """The k3 KL where the policy has barely moved (|ref - logp| ~ 1e-5 .. 1e-3, as at the start of
    GRPO): exp(d) - d - 1 in float32 loses it to cancellation (errors ~1e-7 against a true ~1e-9);
    the kernels keep its value and its gradient to float32's relative precision."""
    B, T, G = 8, 37, 4
    lp = -torch.rand(B, T) * 3
    d = (torch.rand(B, T) * 2 - 1) * torch.logspace(-5, -3, T)
    ref = lp + d
    kw = dict(mask=torch.ones(B, T), rewards=torch.randn(B), group_size=G, ref_logprobs=ref,
              config=GRPOLossConfig(beta=0.5, loss_type="dapo"))
    x = lp.clone().requires_grad_(True)
    _, met = grpo_loss_from_logprobs(x, backend=backend, **kw)
    x64 = lp.double().requires_grad_(True)
    _, met64 = grpo_loss_from_logprobs(x64, backend="reference", **{**kw, "ref_logprobs": ref.double()})
    d64 = ref.double() - lp.double()
    kl64 = (torch.expm1(d64) - d64).mean()
    assert abs(float(met64["kl"]) - float(kl64)) <= 1e-6 * float(kl64)  # (metrics come back in float32)
    assert abs(float(met["kl"]) - float(kl64)) <= 1e-4 * float(kl64), (float(met["kl"]), float(kl64))


def test_pairwise_cover_is_complete():
    keys = list(OPTIONS)
    for a, bk in itertools.combinations(keys, 2):
        for va, vb in itertools.product(OPTIONS[a], OPTIONS[bk]):
            assert any(c[a] == va and c[bk] == vb for c in PAIRWISE), (a, va, bk, vb)


# ---- the whole op from logits and from hidden + weight ------------------------------------------

LOGIT_CASES = [  # (backend, V, B, T, G, dtype); Triton's interpreter gets the small ones
    ("cpp", 7, 8, 37, 2, torch.float32),
    ("cpp", 1000, 8, 37, 4, torch.float32),
    ("cpp", 1000, 16, 5, 16, torch.bfloat16),
    ("cpp", 151936, 4, 1, 2, torch.float32),
    ("cpp", 151936, 4, 2, 4, torch.bfloat16),
    ("triton", 7, 8, 37, 2, torch.float32),
    ("triton", 1000, 4, 3, 2, torch.bfloat16),
    ("triton", 151936, 2, 1, 2, torch.float32),
]
LOGIT_CONFIGS = [
    dict(advantage="grpo", loss_type="dapo", importance_sampling="token", dual_clip=None, beta=0.1,
         entropy_coef=0.1, on_policy=False),
    dict(advantage="rloo", loss_type="grpo", importance_sampling="sequence", dual_clip=1.5, beta=0.0,
         entropy_coef=0.0, on_policy=False),
    dict(advantage="dr_grpo", loss_type="dr_grpo", importance_sampling="token", dual_clip=None, beta=0.0,
         entropy_coef=0.0, on_policy=True),
]


def run_logits(backend, c, b, G, up, logits, temperature=0.7):
    x = logits.detach().clone().requires_grad_(True)
    old = None if c["on_policy"] else b["old"]
    kw = dict(ids=b["ids"], mask=b["mask"], rewards=b["rewards"], group_size=G, old_logprobs=old,
              ref_logprobs=b["ref"], temperature=temperature, config=make_config(c))
    loss, met = grpo_loss(x, backend=backend, **kw) if backend != "reference" else grpo_loss_reference(x, **kw)
    loss.backward(up.to(loss.dtype))
    return loss.detach(), met, x.grad


@pytest.mark.parametrize("backend,V,B,T,G,dtype", LOGIT_CASES)
def test_logits_form_against_reference(backend, V, B, T, G, dtype):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} not available on CPU here")
    b = make_batch(B, T, G, V, dtype, temperature=0.7)
    up = torch.randn(())
    configs = LOGIT_CONFIGS if V * B * T <= 40000 or backend == "cpp" else LOGIT_CONFIGS[:1]
    for c in configs:
        r64 = run_logits("reference", c, b, G, up, b["logits"].double())
        r_same = run_logits("reference", c, b, G, up, b["logits"])
        out = run_logits(backend, c, b, G, up, b["logits"])
        assert_close_to_ref(out[0], r64[0], r_same[0], torch.float32, f"{c} loss")
        assert out[2].dtype == dtype
        assert_close_to_ref(out[2], r64[2], r_same[2], dtype, f"{c} grad_logits")
        for k in r64[1]:
            assert_close_to_ref(out[1][k], r64[1][k], r_same[1][k], torch.float32, f"{c} metric {k}")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_inplace_backward_overwrites_logits(backend):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} not available on CPU here")
    B, T, V, G = 4, 9, 300, 2
    b = make_batch(B, T, G, V, temperature=0.7)
    c = LOGIT_CONFIGS[0]
    up = torch.randn(())
    ref = run_logits(backend, c, b, G, up, b["logits"])
    x = b["logits"].clone().requires_grad_(True)
    kw = dict(ids=b["ids"], mask=b["mask"], rewards=b["rewards"], group_size=G, old_logprobs=b["old"],
              ref_logprobs=b["ref"], temperature=0.7, config=make_config(c, inplace_backward=True))
    loss, _ = grpo_loss(x, backend=backend, **kw)
    loss.backward(up)
    assert torch.equal(loss.detach(), ref[0])
    torch.testing.assert_close(x.grad, ref[2], rtol=0, atol=1e-6)
    assert x.grad.data_ptr() == x.data_ptr(), "in-place backward should reuse the logits' buffer"


TOKEN_COMBOS = [c for c in ALL_COMBOS if c["importance_sampling"] == "token"]
TOKEN_PAIRWISE = [c for c in PAIRWISE if c["importance_sampling"] == "token"]


def check_logits_single_pass(backend, combos, device, dtype=torch.float32, V=37, B=8, T=6, G=4, slice_=False,
                             inplace=False):
    """The single-pass logits path (gradient in the forward) against the float64 reference, for every
    token-level combination in `combos`; slice_: logits[:, :-1] of a (B, T + 1, V) tensor (rows not one
    stride apart); inplace: the gradient over the logits' own buffer."""
    b = make_batch(B, T, G, V, dtype, device=device, temperature=0.7)
    lp = torch.log_softmax(b["logits"].double() / 0.7, -1).gather(-1, b["ids"].clamp(min=0)[..., None])[..., 0]
    b["old"] = away_from_clip(lp.float(), b["old"])
    up = torch.randn((), device=device)
    for c in combos:
        r64 = run_logits("reference", c, b, G, up, b["logits"].double())
        r_same = run_logits("reference", c, b, G, up, b["logits"])
        if slice_:  # (B, T + 1, V), the last position sliced off
            leaf = torch.cat([b["logits"], torch.randn(B, 1, V, device=device).to(dtype)], 1).requires_grad_(True)
            x = leaf[:, :-1]
        else:
            leaf = x = b["logits"].clone().requires_grad_(True)
        before = x.detach().clone()
        old = None if c["on_policy"] else b["old"]
        loss, met = grpo_loss(x, ids=b["ids"], mask=b["mask"], rewards=b["rewards"], group_size=G, old_logprobs=old,
                              ref_logprobs=b["ref"], temperature=0.7, backend=backend,
                              config=make_config(c, inplace_backward=inplace))
        if inplace and dtype != torch.float16:  # the single pass has written the gradient already
            assert not torch.equal(x.detach(), before), f"{c}: the single-pass path was not taken"
        else:  # out of place, or float16 (the two-pass path: a single pass's float16 gradient would underflow)
            assert torch.equal(x.detach(), before), f"{c}: the logits changed in the forward"
        loss.backward(up)
        grad = leaf.grad[:, :-1] if slice_ else x.grad
        if slice_:
            assert (leaf.grad[:, -1] == 0).all()
        assert_close_to_ref(loss.detach(), r64[0], r_same[0], torch.float32, f"{c} loss")
        assert grad.dtype == dtype
        assert_close_to_ref(grad, r64[2], r_same[2], dtype, f"{c} grad_logits")
        for k in r64[1]:
            assert_close_to_ref(met[k], r64[1][k], r_same[1][k], torch.float32, f"{c} metric {k}")
        assert (grad[~b["mask"]] == 0).all()


@pytest.mark.parametrize("part", range(4))
def test_logits_single_pass_every_token_combination(part):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    check_logits_single_pass("cpp", TOKEN_COMBOS[part::4], "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slice_,inplace", [(False, True), (True, False), (True, True)])
def test_logits_single_pass_layouts_and_dtypes(dtype, slice_, inplace):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    check_logits_single_pass("cpp", TOKEN_PAIRWISE[:4], "cpu", dtype, V=1001, B=4, T=5, G=2, slice_=slice_,
                             inplace=inplace)


def check_single_pass_backward_semantics(backend, dev):
    """Upstream 1 returns the stored gradient, another upstream scales it (3, 0 and NaN); a second
    backward raises (the first handed the buffer out: it is the leaf's .grad here); in place, an op
    that saved the logits for its own backward raises rather than read the gradient."""
    B, T, V, G = 4, 5, 50, 2
    b = make_batch(B, T, G, V, temperature=0.7, device=dev)
    lp = torch.log_softmax(b["logits"].double() / 0.7, -1).gather(-1, b["ids"].clamp(min=0)[..., None])[..., 0]
    b["old"] = away_from_clip(lp.float(), b["old"])  # the two paths' log-probs may differ in their last bits
    c = LOGIT_CONFIGS[0]
    kw = dict(ids=b["ids"], mask=b["mask"], rewards=b["rewards"], group_size=G, old_logprobs=b["old"],
              ref_logprobs=b["ref"], temperature=0.7)
    ref = run_logits("reference", c, b, G, torch.tensor(1.0, device=dev), b["logits"].double())
    x = b["logits"].clone().requires_grad_(True)
    loss, _ = grpo_loss(x, backend=backend, config=make_config(c), **kw)
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    assert_close_to_ref(g1, ref[2], ref[2].float(), torch.float32, "upstream 1")
    with pytest.raises(RuntimeError, match="handed out by an earlier backward"):
        (3 * loss).backward()
    torch.testing.assert_close(x.grad, g1, rtol=0, atol=0)  # untouched by the refused backward

    x = b["logits"].clone().requires_grad_(True)
    loss, _ = grpo_loss(x, backend=backend, config=make_config(c), **kw)
    (3 * loss).backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3 * g1)
    with pytest.raises(RuntimeError, match="handed out by an earlier backward"):
        loss.backward()
    for up in (0.0, float("nan")):  # zero and NaN upstreams reach the gradient (no shortcut but 1)
        x = b["logits"].clone().requires_grad_(True)
        loss, _ = grpo_loss(x, backend=backend, config=make_config(c), **kw)
        loss.backward(torch.tensor(up, device=dev))
        assert (x.grad == 0).all() if up == 0 else x.grad.isnan().all()
    two = make_config(c, logits_single_pass=False)  # the two-pass path backs through twice
    x = b["logits"].clone().requires_grad_(True)
    loss, _ = grpo_loss(x, backend=backend, config=two, **kw)
    loss.backward(retain_graph=True)
    loss.backward()
    err = (x.grad - 2 * g1).abs().max().item()  # one rounding apart, relative to the gradient's size
    assert err <= 1e-5 * (2 * g1).abs().max().item(), f"two passes twice vs 2 x single pass: max err {err:.3e}"

    leaf = b["logits"].clone().requires_grad_(True)
    x = leaf * 1.0
    y = x.sin()  # saves x for its backward
    loss, _ = grpo_loss(x, backend=backend, config=make_config(c, inplace_backward=True), **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + y.sum()).backward()

    with torch.no_grad():  # no gradient wanted: the two-pass forward, logits untouched
        x = b["logits"].clone()
        loss0, _ = grpo_loss(x, backend=backend, config=make_config(c, inplace_backward=True), **kw)
    assert torch.equal(x, b["logits"])
    torch.testing.assert_close(loss0, ref[0].float())


def test_logits_single_pass_backward_semantics():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    check_single_pass_backward_semantics("cpp", torch.device("cpu"))


def check_scale_grad(dev):
    """reasonrl::grpo_scale_grad_ (the single pass's backward) on strided batches, every dtype: a
    multiply by the scale (one rounding of the dtype, or two where the CPU rounds the scale to it
    first) unless the scale is exactly 1, where the gradient is left bit for bit; what a view leaves
    out is never written."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        base = torch.randn(3, 9, 1003, device=dev).to(dtype)
        for pick in (lambda t: t, lambda t: t[:, 1:7], lambda t: t[::2, ::3]):  # rows contiguous, batch strided
            for s in (1.0, 0.37, -2.0, 0.0):
                y = base.clone()
                view = pick(y)
                torch.ops.reasonrl.grpo_scale_grad_(view, torch.tensor([s], device=dev))
                if s == 1.0:
                    assert torch.equal(y, base), f"{dtype}: scale 1 changed the gradient"
                    continue
                want = pick(base).double() * s
                tiny = torch.finfo(dtype).smallest_normal * eps  # a subnormal step (float16's 6e-8)
                torch.testing.assert_close(view.double(), want, rtol=2 * eps, atol=tiny,
                                           msg=lambda m: f"{dtype} scale {s} {tuple(view.shape)}: {m}")
                mark = torch.zeros(y.shape, dtype=torch.bool, device=dev)
                pick(mark).fill_(True)
                assert torch.equal(y[~mark], base[~mark]), f"{dtype}: written outside the view"
    g = torch.zeros(2, 3, 4, device=dev)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        torch.ops.reasonrl.grpo_scale_grad_(g, torch.tensor([1.0], dtype=torch.float64, device=dev))
    with pytest.raises(RuntimeError, match="scale must have shape"):
        torch.ops.reasonrl.grpo_scale_grad_(g, torch.ones(2, device=dev))
    with pytest.raises(RuntimeError, match="rows .* must be contiguous"):
        torch.ops.reasonrl.grpo_scale_grad_(g.transpose(1, 2), torch.ones(1, device=dev))
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        torch.ops.reasonrl.grpo_scale_grad_(g.double(), torch.ones(1, device=dev))
    with pytest.raises(RuntimeError, match="rows that share memory"):
        torch.ops.reasonrl.grpo_scale_grad_(torch.zeros(2, 1, 4, device=dev).expand(2, 3, 4), torch.ones(1, device=dev))


def test_scale_grad_op():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    check_scale_grad(torch.device("cpu"))


def test_logits_single_pass_matches_two_passes():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    B, T, V, G = 8, 7, 300, 4
    b = make_batch(B, T, G, V, temperature=0.7)
    for c in PAIRWISE:
        if c["importance_sampling"] != "token":
            continue
        outs = []
        for single in (True, False):
            x = b["logits"].clone().requires_grad_(True)
            loss, met = grpo_loss(x, ids=b["ids"], mask=b["mask"], rewards=b["rewards"], group_size=G,
                                  old_logprobs=None if c["on_policy"] else b["old"], ref_logprobs=b["ref"],
                                  temperature=0.7, backend="cpp", config=make_config(c, logits_single_pass=single))
            loss.backward()
            outs.append((loss.detach(), met, x.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-5, atol=1e-8)
        for k in outs[1][1]:
            torch.testing.assert_close(outs[0][1][k], outs[1][1][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("single_pass,config", [(True, 0), (True, 1), (False, 0)])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_hidden_weight_form(backend, single_pass, config):
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} not available on CPU here")
    check_fused_form(backend, single_pass, config, torch.device("cpu"))


def check_fused_form(backend, single_pass, config, device):
    """The fused form (hidden, LM-head weight) against the float64 reference; single_pass: gradients
    in forward over several chunks of whole sequences (row0 > 0, groups split across chunks)."""
    B, T, H, V, G = 6, 7, 16, 300, 3
    b = make_batch(B, T, G)
    hidden, weight = torch.randn(B * T, H), torch.randn(V, H) / 2
    ids = torch.randint(0, V, (B, T))
    with torch.no_grad():
        lp = torch.log_softmax((hidden @ weight.T).double(), -1).gather(-1, ids.view(-1, 1)).view(B, T)
    old, ref = away_from_clip(lp, near(lp, 0.3)), near(lp, 0.5)
    if LOGIT_CONFIGS[config]["importance_sampling"] == "sequence":
        old = seq_away_from_clip(lp, old, b["mask"])
    up = torch.randn(())
    b = {k: v.to(device) for k, v in b.items()}
    hidden, weight, ids, old, ref, up = (t.to(device) for t in (hidden, weight, ids, old, ref, up))
    cfg = make_config(LOGIT_CONFIGS[config], linear_single_pass=single_pass)
    if single_pass:  # several chunks of whole sequences, groups split across chunks
        monkeypatch_chunk = pytest.MonkeyPatch()
        monkeypatch_chunk.setattr("reasonrl.ops.logprobs._default_chunk_bytes", lambda d: 2 * T * V * 4 + 5)
    else:
        monkeypatch_chunk = None

    def run(bk, dt):
        h = hidden.detach().clone().to(dt).requires_grad_(True)
        w = weight.detach().clone().to(dt).requires_grad_(True)
        kw = dict(hidden=h, weight=w, ids=ids, mask=b["mask"], rewards=b["rewards"], group_size=G,
                  old_logprobs=old, ref_logprobs=ref, config=cfg)
        loss, met = grpo_loss(backend=bk, **kw) if bk != "reference" else grpo_loss_reference(**kw)
        loss.backward(up.to(loss.dtype))
        return loss.detach(), h.grad, w.grad, met

    try:
        r64, r32, out = run("reference", torch.float64), run("reference", torch.float32), run(backend, torch.float32)
        r16, out16 = run("reference", torch.bfloat16), run(backend, torch.bfloat16)
    finally:
        if monkeypatch_chunk is not None:
            monkeypatch_chunk.undo()
    for i, name in ((0, "loss"), (1, "grad_hidden"), (2, "grad_weight")):
        assert_close_to_ref(out[i], r64[i], r32[i], torch.float32, name)
        assert_close_to_ref(out16[i], r64[i], r16[i], torch.bfloat16, f"bf16 {name}")
    for k in r64[3]:
        assert_close_to_ref(out[3][k], r64[3][k], r32[3][k], torch.float32, f"metric {k}")
    with torch.no_grad():  # the no-grad path (old / ref log-probs, evaluation) gives the same loss
        loss_ng, _ = grpo_loss(hidden=hidden, weight=weight, ids=ids, mask=b["mask"], rewards=b["rewards"],
                               group_size=G, old_logprobs=old, ref_logprobs=ref, config=cfg, backend=backend)
    assert_close_to_ref(loss_ng, r64[0], r32[0], torch.float32, "no-grad loss")


@pytest.mark.parametrize("sequence,beta", [(False, 0.1), (True, 0.0)])
def test_compiled_ops_pass_opcheck(sequence, beta):
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    from reasonrl.ops.grpo import _register_fakes

    _register_fakes()
    B, T, G = 4, 5, 2
    lp, mask, rewards = -torch.rand(B, T), (torch.rand(B, T) > 0.3).float(), torch.rand(B)
    old, ref, ent = near(lp, 0.3), near(lp, 0.3), torch.rand(B, T)
    opts = (G, 0, 1e-4, 0.2, 0.28, 1.5, beta, 0.1, 20.0, sequence)
    torch.library.opcheck(torch.ops.reasonrl.grpo_fwd, (lp, old, ref if beta else None, ent, mask, rewards, *opts))
    torch.library.opcheck(torch.ops.reasonrl.grpo_bwd,
                          (torch.randn(B), lp, old, ref if beta else None, mask, rewards, *opts, True))
    if not sequence:
        V = 11
        x, ids = torch.randn(B, T, V), torch.randint(0, V, (B * T,))
        ids[::3] = -100
        tail = (ids, rewards, torch.rand(B), old, ref if beta else None, *opts, 0.7, True, -1)
        torch.library.opcheck(torch.ops.reasonrl.grpo_logits, (x, torch.empty_like(x), *tail))
        torch.library.opcheck(torch.ops.reasonrl.grpo_logits_inplace, (x.clone(), *tail))


def test_compiled_op_rejects_bad_tensors():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("reasonrl._C not built")
    B, T = 4, 5
    opts = (2, 0, 1e-4, 0.2, 0.28, 0.0, 0.0, 0.0, 20.0, False)
    good = dict(lp=torch.zeros(B, T), mask=torch.ones(B, T), rewards=torch.zeros(B))
    with pytest.raises(RuntimeError, match="mask must be float32"):
        torch.ops.reasonrl.grpo_fwd(good["lp"], None, None, None, good["mask"].double(), good["rewards"], *opts)
    with pytest.raises(RuntimeError, match=r"rows \[0, 4\) must lie within rewards of shape \(2,\)"):
        torch.ops.reasonrl.grpo_fwd(good["lp"], None, None, None, good["mask"], torch.zeros(B - 2), *opts)
    with pytest.raises(RuntimeError, match="rewards must be a contiguous float32"):
        torch.ops.reasonrl.grpo_fwd(good["lp"], None, None, None, good["mask"], torch.zeros(B).long(), *opts)
    with pytest.raises(RuntimeError, match="logp must be contiguous"):
        torch.ops.reasonrl.grpo_fwd(torch.zeros(T, B).t(), None, None, None, good["mask"], good["rewards"], *opts)
    with pytest.raises(RuntimeError, match="group_size 3 must be >= 1 and divide B"):
        torch.ops.reasonrl.grpo_fwd(good["lp"], None, None, None, good["mask"], good["rewards"], 3, *opts[1:])


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_strided_inputs_and_other_dtypes(backend):
    """logits as the model's shifted output (B, T + 1, V)[:, :-1], old / ref as transposed views,
    int32 ids, an int64 mask, float64 rewards."""
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} not available on CPU here")
    B, T, V, G = 4, 6, 33, 2
    b = make_batch(B, T, G, V, temperature=0.7)
    big = torch.randn(B, T + 1, V)
    big[:, :-1] = b["logits"]
    old_t, ref_t = b["old"].t().contiguous().t(), b["ref"].t().contiguous().t()  # (B, T), strides (1, B)
    assert not old_t.is_contiguous()
    c = LOGIT_CONFIGS[0]
    cfg = make_config(c)
    up = torch.randn(())
    kw = dict(rewards=b["rewards"], group_size=G, temperature=0.7, config=cfg)
    x = big.clone().requires_grad_(True)
    loss, met = grpo_loss(x[:, :-1], ids=b["ids"].int(), mask=b["mask"].long(), old_logprobs=old_t,
                          ref_logprobs=ref_t, backend=backend, **{**kw, "rewards": b["rewards"].double()})
    loss.backward(up)
    want = run_logits("reference", c, b, G, up, b["logits"].double())
    same = run_logits("reference", c, b, G, up, b["logits"])
    assert_close_to_ref(loss.detach(), want[0], same[0], torch.float32, "loss")
    assert_close_to_ref(x.grad[:, :-1], want[2], same[2], torch.float32, "grad_logits")
    assert (x.grad[:, -1] == 0).all()


TRITON_COMPILE_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
from reasonrl.kernels import grpo as K

ptr, i32, f32 = "*fp32", "i32", "fp32"
sig = {
    K._grpo_fwd_kernel: dict(STATS=ptr, LOGP=ptr, OLD=ptr, REF=ptr, ENT=ptr, MASK=ptr, R=ptr, row0=i32, T=i32,
                             G=i32, std_eps=f32, lo=f32, hi=f32, dual=f32, beta=f32, ent_coef=f32, C=f32),
    K._grpo_bwd_kernel: dict(GRAD_LOGP=ptr, GRAD_ENT=ptr, SCALE=ptr, LOGP=ptr, OLD=ptr, REF=ptr, MASK=ptr, R=ptr,
                             row0=i32, T=i32, G=i32, std_eps=f32, lo=f32, hi=f32, dual=f32, beta=f32, ent_coef=f32,
                             C=f32),
}
variants = [(1, 1, 1, 0, 1, 0), (0, 0, 0, 1, 0, 1), (1, 0, 1, 1, 1, 2), (0, 1, 0, 0, 0, 0), (1, 1, 0, 1, 0, 1)]
for (old, ref, ent, seq, dual, adv), fn in itertools.product(variants, sig):
    const = dict(HAS_OLD=bool(old), HAS_REF=bool(ref), SEQ=bool(seq), DUAL=bool(dual), ADV=adv, BLOCK_T=64, BLOCK_G=4)
    const["HAS_ENT" if fn is K._grpo_fwd_kernel else "WITH_ENT"] = bool(ent)
    try:
        triton.compile(ASTSource(fn=fn, signature={**sig[fn], **{k: "constexpr" for k in const}}, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
    except CompilationError as e:
        print("COMPILE ERROR", const, str(e)[-800:])
        sys.exit(3)
print("ok")
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts code that compiled Triton rejects (a loop-carried name changing type
    did): compile a set of variants for sm_90 to PTX, which needs no GPU."""
    import os
    import subprocess
    import sys

    if not _backend.triton_importable():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", TRITON_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode == 3:
        pytest.fail(r.stdout[-1500:])
    if r.returncode != 0:
        pytest.skip(f"could not run Triton's CUDA compiler here: {r.stderr.strip()[-300:]}")
    assert r.stdout.strip().endswith("ok")


# ---- numerics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_zero_variance_groups_give_zero_advantage(backend):
    B, T, G = 8, 6, 4
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.7])  # mean(0.1 x4) != 0.1 in floats
    lp = (-torch.rand(B, T)).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.bool)
    for adv in ("grpo", "dr_grpo", "rloo"):
        cfg = GRPOLossConfig(advantage=adv, compute_entropy=False)
        loss, met = grpo_loss_from_logprobs(lp, mask=mask, rewards=rewards, group_size=G,
                                            old_logprobs=near(lp.detach(), 0.3), config=cfg, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and (lp.grad == 0).all(), adv
        assert met["zero_std_frac"].item() == 1.0 and met["advantage_mean"].item() == 0.0
        lp.grad = None


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_extreme_log_ratios_are_clamped(backend):
    B, T, G = 4, 5, 2
    lp = (-torch.rand(B, T)).requires_grad_(True)
    old = lp.detach().clone()
    old[0] -= 200.0  # ratio e^200 -> clamped to e^20
    old[1] += 200.0
    ref = lp.detach() + 300.0  # exp(300) overflows float32 without the clamp
    cfg = GRPOLossConfig(beta=0.5, dual_clip=3.0, loss_type="bnpo", compute_entropy=False)
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0])
    loss, met = grpo_loss_from_logprobs(lp, mask=torch.ones(B, T), rewards=rewards, group_size=G,
                                        old_logprobs=old, ref_logprobs=ref, config=cfg, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v) for v in met.values())
    # outside the clamp the log-ratio is flat: no surrogate gradient, and the KL's d is clamped too
    assert (lp.grad[:2] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # Triton's interpreter: NaN * 0, masked
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_fully_masked_rows_contribute_nothing(backend):
    B, T, G = 6, 8, 3
    lp = (-torch.rand(B, T)).requires_grad_(True)
    ent = torch.rand(B, T).requires_grad_(True)
    old, ref = near(lp.detach(), 0.3), near(lp.detach(), 0.3)
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0, 0.0])
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    mask[4] = False
    cfg = GRPOLossConfig(beta=0.1, entropy_coef=0.1, loss_type="bnpo")
    kw = dict(rewards=rewards, group_size=G, old_logprobs=old, ref_logprobs=ref, config=cfg, backend=backend)
    loss, met = grpo_loss_from_logprobs(lp, ent, mask=mask, **kw)
    loss.backward()
    assert (lp.grad[4] == 0).all() and (ent.grad[4] == 0).all()
    # garbage in the masked row changes nothing
    lp2 = lp.detach().clone()
    lp2[4] = float("nan")
    ent2 = ent.detach().clone()
    ent2[4] = float("inf")
    loss2, met2 = grpo_loss_from_logprobs(lp2, ent2, mask=mask, **kw)
    assert torch.equal(loss.detach(), loss2) and all(torch.equal(met[k], met2[k]) for k in met)
    # an all-masked batch: zero loss, zero grads, no NaN
    lp.grad = None
    loss3, met3 = grpo_loss_from_logprobs(lp, ent, mask=torch.zeros(B, T), **kw)
    loss3.backward()
    assert loss3.item() == 0.0 and (lp.grad == 0).all() and all(torch.isfinite(v) for v in met3.values())


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_on_policy_gradient_is_minus_advantage(backend):
    """old = None: ratio 1, d loss / d logp_t = -A_b / (token count) for "bnpo"."""
    B, T, G = 4, 3, 2
    lp = (-torch.rand(B, T)).requires_grad_(True)
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    cfg = GRPOLossConfig(loss_type="bnpo", compute_entropy=False)
    loss, _ = grpo_loss_from_logprobs(lp, mask=torch.ones(B, T), rewards=rewards, group_size=G,
                                      config=cfg, backend=backend)
    loss.backward()
    r = rewards.view(-1, G)
    A = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(lp.grad, (-A / (B * T))[:, None].expand(B, T), rtol=1e-5, atol=1e-7)
    assert abs(loss.item()) < 1e-6  # sum of A over a group is 0


def test_dapo_with_global_token_count_and_dr_grpo_constant():
    B, T, G = 4, 6, 2
    lp = (-torch.rand(B, T)).double()
    kw = dict(mask=torch.ones(B, T), rewards=torch.tensor([1.0, 0.0, 0.0, 2.0]), group_size=G,
              old_logprobs=near(lp, 0.3).double())
    bn, _ = grpo_loss_from_logprobs_reference(lp, config=GRPOLossConfig(loss_type="bnpo"), **kw)
    da, _ = grpo_loss_from_logprobs_reference(lp, config=GRPOLossConfig(loss_type="dapo"),
                                              num_items_in_batch=3 * B * T, **kw)
    dr, _ = grpo_loss_from_logprobs_reference(lp, config=GRPOLossConfig(loss_type="dr_grpo", max_completion_length=4 * T), **kw)
    torch.testing.assert_close(da * 3, bn)
    torch.testing.assert_close(dr * 4, bn)  # full mask: B*T tokens
    for backend in CPU_BACKENDS:
        out, _ = grpo_loss_from_logprobs(lp.float(), config=GRPOLossConfig(loss_type="dapo"),
                                         num_items_in_batch=3 * B * T, backend=backend, **kw)
        torch.testing.assert_close(out.double(), da, rtol=1e-5, atol=1e-6)


# ---- errors ------------------------------------------------------------------------------------

def _args(B=4, T=3, V=5, G=2):
    return dict(logits=torch.randn(B, T, V), ids=torch.randint(0, V, (B, T)), mask=torch.ones(B, T),
                rewards=torch.rand(B), group_size=G)


@pytest.mark.parametrize("change,err,match", [
    (dict(group_size=3), ValueError, "not a multiple of group_size"),
    (dict(group_size=1), ValueError, "group_size 1"),
    (dict(group_size=0), ValueError, "group_size must be a positive int"),
    (dict(rewards=torch.rand(5)), ValueError, "rewards must be a"),
    (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), ValueError, "NaN"),
    (dict(mask=torch.ones(4, 2)), ValueError, "mask must have shape"),
    (dict(old_logprobs=torch.ones(4, 2)), ValueError, "old_logprobs must have shape"),
    (dict(config=GRPOLossConfig(beta=0.1)), ValueError, "needs ref_logprobs"),
    (dict(logits=torch.randn(4, 2, 5)), ValueError, "logits must have shape"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(num_items_in_batch=10, config=GRPOLossConfig(loss_type="bnpo")), ValueError, "num_items_in_batch"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
    (dict(config="dapo"), TypeError, "GRPOLossConfig"),
])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_arguments_raise_clearly(backend, change, err, match):
    kw = {**_args(), "backend": backend, **change}
    with pytest.raises(err, match=match):
        grpo_loss(**kw)


def test_group_size_one_is_fine_for_dr_grpo_advantages():
    kw = {**_args(G=1), "config": GRPOLossConfig(advantage="dr_grpo")}
    loss, met = grpo_loss(**kw, backend="reference")
    assert loss.item() == 0.0 and met["zero_std_frac"].item() == 1.0


@pytest.mark.parametrize("field,value", [
    ("advantage", "ppo"), ("loss_type", "sum"), ("importance_sampling", "token_seq"), ("epsilon_low", 1.0),
    ("epsilon_high", -0.1), ("dual_clip", 1.0), ("beta", -1.0), ("log_ratio_clamp", 0.0), ("std_eps", -1.0),
    ("max_completion_length", 0),
])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOLossConfig(**{field: value})


def test_unavailable_backend_names_the_reason():
    if _backend.why_unavailable("cuda", torch.device("cpu")) is None:
        pytest.skip("cuda runs CPU tensors here?")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        grpo_loss(**_args(), backend="cuda")


# ---- agreement with TRL's GRPOTrainer loss, transcribed from its documentation ------------------

def trl_loss(logits, ids, mask, rewards, G, old, ref, temperature, beta, eps_low, eps_high, loss_type,
             scale_rewards, level, max_completion_length):
    """TRL GRPOTrainer (docs "GRPO Trainer" -> "Computing the loss", trl >= 0.20), written as there:
    A_i = (r_i - mean(r)) / std(r) (scale_rewards) or r_i - mean(r); std with Bessel, + 1e-4;
    log_ratio = logp - old; token: w = log_ratio; sequence (GSPO): w = sum(log_ratio m) / max(sum m, 1);
    coef_1 = exp(w), coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high);
    per_token_loss = -min(coef_1 A, coef_2 A) + beta (exp(ref - logp) - (ref - logp) - 1)."""
    logps = torch.log_softmax(logits / temperature, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    r = rewards.view(-1, G)
    mean = r.mean(1).repeat_interleave(G)
    A = rewards - mean
    if scale_rewards:
        A = A / (r.std(1).repeat_interleave(G) + 1e-4)
    old = logps.detach() if old is None else old
    log_ratio = logps - old
    if level == "token":
        w = log_ratio
    else:
        w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(w)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * A.unsqueeze(1), coef_2 * A.unsqueeze(1))
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):  # dapo: / global active tokens; one process: the same
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_agrees_with_trl_formula(loss_type, level):
    B, T, V, G = 8, 11, 13, 4
    logits = torch.randn(B, T, V, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1))).double()
    rewards = torch.randint(0, 3, (B,)).double()
    rewards[:G] = 2.0  # an equal-rewards group: exact mean, so TRL's advantage is exactly 0 as well
    with torch.no_grad():
        lp = torch.log_softmax(logits / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    old, ref = lp + 0.3 * torch.randn(B, T, dtype=torch.float64), lp + 0.3 * torch.randn(B, T, dtype=torch.float64)
    for scale, beta, on_policy in itertools.product((True, False), (0.0, 0.04), (False, True)):
        o = None if on_policy else old
        x1 = logits.clone().requires_grad_(True)
        want = trl_loss(x1, ids, mask, rewards, G, o, ref, 0.9, beta, 0.2, 0.28, loss_type, scale, level, 2 * T)
        want.backward()
        cfg = GRPOLossConfig(advantage="grpo" if scale else "dr_grpo", beta=beta, epsilon_low=0.2,
                             epsilon_high=0.28, loss_type=loss_type, importance_sampling=level,
                             max_completion_length=2 * T, compute_entropy=False)
        for backend in ["reference"] + CPU_BACKENDS[:1]:
            x2 = (logits if backend == "reference" else logits.float()).clone().requires_grad_(True)
            got, _ = grpo_loss(x2, ids=ids, mask=mask, rewards=rewards, group_size=G, old_logprobs=o,
                               ref_logprobs=ref, temperature=0.9, config=cfg, backend=backend)
            got.backward()
            tol = 1e-12 if backend == "reference" else 2e-5
            torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
            torch.testing.assert_close(x2.grad.double(), x1.grad, rtol=tol, atol=tol)


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("single_pass,config", [(True, 0), (True, 1), (False, 0)])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_fused_hidden_weight_form(backend, single_pass, config):
    """check_fused_form on the GPU: the single-pass path's row offsets (row0 > 0) in the GPU kernels."""
    dev = torch.device("cuda")
    if _backend.why_unavailable(backend, dev) is not None:
        pytest.skip(_backend.why_unavailable(backend, dev))
    check_fused_form(backend, single_pass, config, dev)


@pytest.mark.gpu
@pytest.mark.parametrize("part", range(5))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_all_option_combinations(backend, part):
    """Every combination at one shape (parts 0-3: a quarter each), a pairwise cover at the others
    (part 4). In parts because the Triton compiles of the combinations took 60 s in one test on an
    H200: the GPU check spreads its tests over workers."""
    dev = torch.device("cuda")
    if _backend.why_unavailable(backend, dev) is not None:
        pytest.skip(_backend.why_unavailable(backend, dev))
    if part < 4:
        check_combos(backend, ALL_COMBOS[part::4], 12, 37, 4, device=dev)
        return
    for T, G, B in [(1, 2, 4), (37, 16, 32), (2048, 8, 16)]:
        check_combos(backend, PAIRWISE, B, T, G, device=dev)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_logits_form(backend, dtype):
    dev = torch.device("cuda")
    if _backend.why_unavailable(backend, dev) is not None:
        pytest.skip(_backend.why_unavailable(backend, dev))
    for V, B, T, G in [(7, 8, 37, 2), (1000, 16, 37, 4), (151936, 8, 64, 4)]:
        b = make_batch(B, T, G, V, dtype, device=dev, temperature=0.7)
        up = torch.randn((), device=dev)
        for c in LOGIT_CONFIGS:
            r64 = run_logits("reference", c, b, G, up, b["logits"].double())
            r_same = run_logits("reference", c, b, G, up, b["logits"])
            out = run_logits(backend, c, b, G, up, b["logits"])
            assert_close_to_ref(out[0], r64[0], r_same[0], torch.float32, f"{c} loss")
            assert_close_to_ref(out[2], r64[2], r_same[2], dtype, f"{c} grad_logits")


def check_against_two_pass(dev, dtype, V, B, T, G, slice_, c, rel):
    """Single pass against the same backend's two-pass path at upstream 1: the same per-element formula,
    so the gradients agree to a rounding of the dtype relative to their own size (the float64 check's
    absolute floor, 2e-2 in bf16, is above a whole 151936-wide gradient row: it could not see one)."""
    b = make_batch(B, T, G, V, dtype, device=dev, temperature=0.7)
    lp = torch.log_softmax(b["logits"].double() / 0.7, -1).gather(-1, b["ids"].clamp(min=0)[..., None])[..., 0]
    b["old"] = away_from_clip(lp.float(), b["old"])  # the two paths' log-probs differ in their last bits
    extra = torch.randn(B, 1, V, device=dev).to(dtype)
    kw = dict(ids=b["ids"], mask=b["mask"], rewards=b["rewards"], group_size=G, ref_logprobs=b["ref"],
              old_logprobs=None if c["on_policy"] else b["old"], temperature=0.7, backend="cuda")
    out = []
    for single in (True, False):
        leaf = torch.cat([b["logits"], extra], 1) if slice_ else b["logits"].clone()
        leaf.requires_grad_(True)
        x = leaf[:, :-1] if slice_ else leaf
        loss, _ = grpo_loss(x, config=make_config(c, logits_single_pass=single), **kw)
        loss.backward()
        out.append((loss.detach(), leaf.grad))
    (l1, g1), (l2, g2) = out
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    scale = g2.abs().max().item()
    assert scale > 0
    err = (g1.double() - g2.double()).abs().max().item()
    assert err <= rel * scale, f"{c} V={V} slice={slice_}: max err {err:.3e} > {rel} x {scale:.3e}"


@pytest.mark.gpu
def test_gpu_single_pass_backward_and_scale_grad():
    """The CUDA backward of the single pass: the scale kernel that reads the upstream value on the
    device (no host sync), against torch's multiply; and the backward semantics as on the CPU."""
    dev = torch.device("cuda")
    if _backend.why_unavailable("cuda", dev) is not None:
        pytest.skip(_backend.why_unavailable("cuda", dev))
    check_scale_grad(dev)
    check_single_pass_backward_semantics("cuda", dev)
    # no host sync in the backward (the upstream value is read on the device)
    b = make_batch(4, 5, 2, 1001, torch.bfloat16, device=dev, temperature=0.7)
    x = b["logits"].clone().requires_grad_(True)
    loss, _ = grpo_loss(x, ids=b["ids"], mask=b["mask"], rewards=b["rewards"], group_size=2, old_logprobs=b["old"],
                        ref_logprobs=b["ref"], temperature=0.7, backend="cuda", config=make_config(LOGIT_CONFIGS[0]))
    torch.cuda.set_sync_debug_mode("error")
    try:
        (0.5 * loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("stage_kb", [None, "0", "1", "16", "256"])
def test_gpu_logits_single_pass(stage_kb, monkeypatch):
    """The CUDA single-pass kernel. Against the float64 reference: every token-level combination (one
    stage setting), layouts (rows not 16-byte aligned: V = 1001; a sliced batch written out of place,
    whose rows are misaligned against the fresh gradient: the all-scalar path; and in place) and dtypes.
    Against the CUDA two-pass path, relative to the gradient's size: V = 5003 sliced (the pairs-of-
    vectors loops on misaligned rows) and the anchor vocabulary in bf16, where the default stages part
    of each 297 KiB row (112 KiB: two blocks an SM) and reads the rest back from L2, stage 1 KiB almost none, 16 KiB
    some, 0 none, 256 KiB all that one block per SM can hold (227 KiB, 1024 threads)."""
    dev = torch.device("cuda")
    if _backend.why_unavailable("cuda", dev) is not None:
        pytest.skip(_backend.why_unavailable("cuda", dev))
    if stage_kb is not None:
        monkeypatch.setenv("REASONRL_GRPO_STAGE_KB", stage_kb)
    if stage_kb is None:
        check_logits_single_pass("cuda", TOKEN_COMBOS, dev)
    for dtype in (torch.float32, torch.bfloat16):
        for slice_, inplace in ((False, True), (True, False), (True, True)):
            check_logits_single_pass("cuda", TOKEN_PAIRWISE[:3], dev, dtype, V=1001, B=4, T=5, G=2, slice_=slice_,
                                     inplace=inplace)
    c = LOGIT_CONFIGS[0]  # KL and entropy bonus: the entropy term of the gradient too
    for dtype, rel in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)):
        check_against_two_pass(dev, dtype, 5003, 4, 5, 2, True, c, rel)
    check_against_two_pass(dev, torch.bfloat16, 151936, 8, 64, 4, False, c, 2 ** -7)
    check_against_two_pass(dev, torch.bfloat16, 151936, 4, 16, 4, False, LOGIT_CONFIGS[2], 2 ** -7)


# ---- bad input: masked vocabularies, mask / old / ref values, argument types ----------------------

@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_masked_vocabulary_entropy_bonus_is_finite(backend):
    """-inf logits (masked vocabulary) with an entropy bonus: finite loss, entropy metric and grads,
    equal to the float64 loss on the unmasked columns alone; zero gradient on the masked ones."""
    B, T, G, V = 4, 5, 2, 11
    b = make_batch(B, T, G, V=7)
    keep = torch.randperm(V)[:7].sort().values
    logits = torch.full((B, T, V), float("-inf"), dtype=torch.float64)
    logits[:, :, keep] = b["logits"].double()
    ids = torch.where(b["mask"], keep[b["ids"].clamp(min=0)], b["ids"])
    cfg = GRPOLossConfig(entropy_coef=0.1, beta=0.05)
    kw = dict(mask=b["mask"], rewards=b["rewards"], group_size=G, old_logprobs=b["old"],
              ref_logprobs=b["ref"], temperature=0.9, config=cfg)
    x64 = b["logits"].double().requires_grad_(True)
    want, want_m = grpo_loss(x64, ids=b["ids"], backend="reference", **kw)
    want.backward()
    x = logits.float().requires_grad_(True)
    got, got_m = grpo_loss(x, ids=ids, backend=backend, **kw)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(got_m["entropy"]) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_m["entropy"], want_m["entropy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad[:, :, keep].double(), x64.grad, rtol=1e-5, atol=1e-6)
    masked_cols = torch.ones(V, dtype=torch.bool)
    masked_cols[keep] = False
    assert (x.grad[:, :, masked_cols] == 0).all()


def _bad_values():
    nan, inf = float("nan"), float("inf")
    m = torch.ones(4, 3)
    m[1, 2] = 0.0
    old_nan = torch.zeros(4, 3)
    old_nan[2, 1] = nan
    ref_inf = torch.zeros(4, 3)
    ref_inf[3, 0] = -inf
    return [
        (dict(mask=torch.full((4, 3), nan)), "mask must hold only 0 and 1"),
        (dict(mask=-m), "mask must hold only 0 and 1"),
        (dict(mask=m * 0.5), "mask must hold only 0 and 1"),
        (dict(old_logprobs=old_nan), r"old_logprobs must be finite where mask is on, found nan at \(b, t\) = \(2, 1\)"),
        (dict(old_logprobs=torch.full((4, 3), inf)), "old_logprobs must be finite"),
        (dict(ref_logprobs=ref_inf, config=GRPOLossConfig(beta=0.1)), "ref_logprobs must be finite"),
    ]


@pytest.mark.parametrize("change,match", _bad_values())
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_mask_and_logprob_values_are_checked(backend, change, match):
    with pytest.raises(ValueError, match=match):
        grpo_loss(**{**_args(), "backend": backend, **change})
    lp = -torch.rand(4, 3)
    kw = {k: v for k, v in {**_args(), **change}.items() if k not in ("logits", "ids")}
    with pytest.raises(ValueError, match=match):
        grpo_loss_from_logprobs(lp, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["reference", "auto", *CPU_BACKENDS])
@pytest.mark.parametrize("fused", [False, True])
def test_ids_out_of_range_where_mask_is_on_raise(backend, fused):
    """The ids' range is one of the value checks (on CUDA made after the kernels are enqueued):
    an id outside [0, V) where the mask is on raises naming it; under mask 0 it is never read."""
    kw = _args()
    if fused:
        H = 6
        kw = {**kw, "hidden": torch.randn(12, H, requires_grad=True), "weight": torch.randn(5, H)}
        del kw["logits"]
    kw["ids"][2, 1] = 5
    with pytest.raises(IndexError, match=r"ids out of range \[0, 5\).*found 5 at \(b, t\) = \(2, 1\)"):
        grpo_loss(**kw, backend=backend)
    kw["ids"][2, 1] = -7
    kw["mask"][2, 1] = 0
    loss, _ = grpo_loss(**kw, backend=backend)
    assert torch.isfinite(loss)


def _to(kw, dev):
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_value_checks_raise(backend):
    """On CUDA the value checks run on a side stream beside the kernels (reasonrl.ops.grpo._check_values):
    each bad value still raises naming what and where, with the gradient wanted (the single pass on
    cuda) or not, and inputs without a bad value pass."""
    dev = torch.device("cuda")
    if _backend.why_unavailable(backend, dev) is not None:
        pytest.skip(_backend.why_unavailable(backend, dev))
    for change, match in _bad_values():
        for grad in (False, True):
            kw = _to({**_args(), **change}, dev)
            kw["logits"].requires_grad_(grad)
            with pytest.raises(ValueError, match=match):
                grpo_loss(**kw, backend=backend)
    kw = _to(_args(), dev)
    kw["ids"][2, 1] = 5
    with pytest.raises(IndexError, match=r"ids out of range \[0, 5\).*found 5 at \(b, t\) = \(2, 1\)"):
        grpo_loss(**kw, backend=backend)
    kw["mask"][2, 1] = 0
    loss, _ = grpo_loss(**kw, backend=backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_garbage_at_masked_positions_is_still_fine(backend):
    """Only unmasked positions are checked: NaN old / ref log-probs under mask 0 are never read."""
    kw = _args()
    kw["mask"][1, 1:] = 0
    bad = torch.zeros(4, 3)
    bad[1, 1:] = float("nan")
    loss, met = grpo_loss(**kw, old_logprobs=bad, ref_logprobs=bad, config=GRPOLossConfig(beta=0.1),
                          backend=backend)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in met.values())
    loss, _ = grpo_loss(**{**kw, "mask": kw["mask"].bool()}, backend=backend)  # a bool mask is fine
    assert torch.isfinite(loss)


@pytest.mark.parametrize("change,err,match", [
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(rewards=[1.0, 0.0, 1.0, 0.0]), TypeError, "rewards must be a torch.Tensor, got list"),
    (dict(old_logprobs=[[0.0] * 3] * 4), TypeError, "old_logprobs must be a torch.Tensor"),
    (dict(num_items_in_batch="abc"), TypeError, "num_items_in_batch must be a number"),
    (dict(num_items_in_batch=float("inf")), ValueError, "num_items_in_batch must be a finite number"),
    (dict(num_items_in_batch=True), TypeError, "num_items_in_batch"),
])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_argument_types_and_values_are_named(backend, change, err, match):
    with pytest.raises(err, match=match):
        grpo_loss(**{**_args(), "backend": backend, **change})


@pytest.mark.parametrize("backend", ["reference", "auto"] + CPU_BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_fused_empty_batch(backend, grad):
    """hidden (0, H): zero loss and no error, with and without grad (the no-grad path chunks rows)."""
    h = torch.randn(0, 8, requires_grad=grad)
    w = torch.randn(10, 8)
    kw = dict(ids=torch.zeros(0, 3, dtype=torch.long), mask=torch.ones(0, 3), rewards=torch.zeros(0), group_size=2)
    with torch.set_grad_enabled(grad):
        loss, met = grpo_loss(hidden=h, weight=w, backend=backend, **kw)
    assert loss.item() == 0.0 and met["num_tokens"].item() == 0.0
    if grad:
        loss.backward()
        assert h.grad.shape == (0, 8)


@pytest.mark.parametrize("field,value,err", [
    ("entropy_coef", "a", TypeError), ("epsilon_low", "0.2", TypeError), ("beta", None, TypeError),
    ("max_completion_length", 2.5, TypeError), ("max_completion_length", True, TypeError),
    ("dual_clip", "2", TypeError), ("compute_entropy", "yes", TypeError),
    ("beta", float("inf"), ValueError), ("log_ratio_clamp", float("inf"), ValueError),
    ("entropy_coef", float("nan"), ValueError), ("std_eps", float("inf"), ValueError),
    ("epsilon_high", float("inf"), ValueError), ("dual_clip", float("inf"), ValueError),
])
def test_config_types_and_finiteness(field, value, err):
    with pytest.raises(err, match=f"GRPOLossConfig.{field}"):
        GRPOLossConfig(**{field: value})


# ---- found by an audit (2026-11-29) -------------------------------------------------------------------
def test_reference_advantages_of_huge_float32_rewards():
    """Rewards of 3e38 are finite in float32; their std overflowed there, and every advantage was 0."""
    from reasonrl.ops.grpo import group_advantages_reference
    r = torch.tensor([3e38, -3e38, 3e38, -3e38], dtype=torch.float32)
    adv, zero = group_advantages_reference(r, 4, GRPOLossConfig())
    assert adv.dtype == torch.float32 and not zero.any()
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 1.0, -1.0]) * (3 / 4) ** 0.5, rtol=1e-5)


def test_reference_masked_rows_with_nan_give_finite_gradients():
    """NaN logits (or hidden states) at fully masked positions: the reference's gradients were NaN."""
    B, T, V, H = 2, 3, 5, 4
    ids, rewards = torch.randint(0, V, (B, T)), torch.tensor([1.0, 0.0])
    mask = torch.ones(B, T)
    mask[1, 2] = 0
    x = torch.randn(B, T, V)
    x[1, 2] = float("nan")
    x.requires_grad_(True)
    loss, _ = grpo_loss(x, ids=ids, mask=mask, rewards=rewards, group_size=2, backend="reference")
    loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1, 2] == 0).all()
    h, w = torch.randn(B * T, H), torch.randn(V, H, requires_grad=True)
    h[5] = float("nan")
    loss, _ = grpo_loss(hidden=h, weight=w, ids=ids, mask=mask, rewards=rewards, group_size=2, backend="reference")
    loss.backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_a_nan_entropy_reaches_no_loss_without_an_entropy_bonus(backend):
    """The kernels subtracted entropy_coef * H with entropy_coef = 0, so a NaN entropy made the loss NaN
    where the reference's was finite (2026-11-30); the metric still reports it."""
    B, T = 4, 5
    torch.manual_seed(0)
    logp = (-torch.rand(B, T)).requires_grad_()
    ent = torch.rand(B, T)
    ent[1, 2] = float("nan")
    loss, metrics = grpo_loss_from_logprobs(logp, ent, mask=torch.ones(B, T), rewards=torch.randn(B), group_size=2,
                                            config=GRPOLossConfig(), backend=backend)
    assert torch.isfinite(loss), backend
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert metrics["entropy"].isnan()
