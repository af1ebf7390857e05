"""bf16 autocast through the training path: the fused LM-head ops take autocast's dtype as a Linear
would (and never let autocast recast the matmuls inside their kernels), and the trainers'
`precision` field runs the forward under it with float32 master weights."""
import dataclasses

import pytest
import torch

from reasonrl.models import ModelConfig, builtin_path, init_model
from reasonrl.ops import linear_token_logprobs, token_logprobs
from reasonrl.ops.grpo import GRPOLossConfig, grpo_loss
from reasonrl.train.common import autocast
from reasonrl.train.config import GRPOConfig, SFTConfig
from reasonrl.train.grpo import train_on_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(N=37, H=24, V=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    return h, w, ids


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_linear_logprobs_under_cpu_autocast_equal_explicit_bf16(backend):
    h, w, ids = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_token_logprobs(h, w, ids, backend=backend)
    got.sum().backward()
    assert got.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    ref = linear_token_logprobs(hb, wb, ids, backend=backend)  # what autocast should amount to
    ref.sum().backward()
    assert torch.equal(got, ref)
    assert torch.equal(gh, hb.grad.float()) and torch.equal(gw, wb.grad.float())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_grpo_loss_fused_under_cpu_autocast(backend):
    B, T, H, V = 8, 5, 24, 101
    h, w, _ = _inputs(B * T, H, V, seed=1)
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.2).float()
    rewards = torch.tensor([0., 1, 1, 0, 1, 1, 1, 0])
    kw = dict(ids=ids, mask=mask, rewards=rewards, group_size=4, config=GRPOLossConfig(), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, m = grpo_loss(hidden=h, weight=w, **kw)
    loss.backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    ref, _ = grpo_loss(hidden=hb, weight=wb, **kw)
    ref.backward()
    if backend == "cpp":  # the kernels see the same bf16 operands
        assert torch.equal(loss, ref) and torch.equal(h.grad, hb.grad.float())
    else:  # the reference's own ops run in float32 under autocast, in bf16 outside it
        assert (loss - ref).abs().item() < 1e-2 * ref.abs().item() + 1e-3
        assert (h.grad - hb.grad.float()).abs().max().item() < 2e-2 * hb.grad.abs().max().item()


def test_logits_ops_unchanged_under_autocast():
    """token_logprobs takes logits as given: autocast does not recast them."""
    logits = torch.randn(6, 50)
    ids = torch.randint(0, 50, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(logits, ids)
    assert torch.equal(got, token_logprobs(logits, ids))


def test_autocast_helper_and_config_check():
    cpu_model = torch.nn.Linear(2, 2)
    with autocast(cpu_model, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu_model, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(cpu_model, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="GRPOConfig.precision"):
        GRPOConfig(precision="fp16")
    with pytest.raises(ValueError, match="SFTConfig.precision"):
        SFTConfig(precision="half")


def test_grpo_update_bf16_close_to_fp32():
    """One GRPO update's gradient under precision="bf16" points where the float32 one does."""
    cfg_m = dataclasses.replace(ModelConfig.from_json(builtin_path("tiny")), hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    g = torch.Generator().manual_seed(0)
    gs = []
    for i in range(3):
        prompt = torch.randint(3, 80, (9,), generator=g).tolist()

        class C:
            def __init__(self, n):
                self.token_ids, self.finish_reason = torch.randint(3, 80, (n,), generator=g).tolist(), "stop"
        gs.append({"prompt": prompt, "completions": [C(5 + 3 * j) for j in range(4)], "rewards": [0.0, 1.0, 0.1, 1.0]})

    class Rec:
        def __init__(self, model):
            self.model = model

        def step(self):
            self.g = torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None])

        def zero_grad(self, set_to_none=True):
            self.model.zero_grad(set_to_none=set_to_none)
    out = {}
    for precision in ("fp32", "bf16"):
        model = init_model(cfg_m, seed=4)
        rec = Rec(model)
        train_on_groups(model, None, rec, gs, GRPOConfig(group_size=4, precision=precision, mu=2),
                        GRPOLossConfig(max_completion_length=11))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        out[precision] = rec.g
    a, b = out["fp32"], out["bf16"]
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (b.norm() / a.norm() - 1).abs() < 0.05


def test_engine_bf16_rollout_copy_matches_a_bf16_model():
    """LLMEngine(dtype=bf16) on float32 weights samples exactly what the same engine does on a bf16
    copy of the model, and leaves the weights as they were."""
    import copy

    from reasonrl.engine import LLMEngine, SamplingParams
    cfg_m = dataclasses.replace(ModelConfig.from_json(builtin_path("tiny")), hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = init_model(cfg_m, seed=5)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    prompts = [[1, 5, 9, 12], [1, 7], [1, 30, 31, 32, 33, 34]]
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=3, ignore_eos=True)
    got = LLMEngine(model, dtype=torch.bfloat16).generate(prompts, params, n=3)
    ref = LLMEngine(copy.deepcopy(model).to(torch.bfloat16)).generate(prompts, params, n=3)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in ref]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    fp32 = LLMEngine(model).generate(prompts, params, n=3)  # the default: the weights as they are
    assert all(len(c.token_ids) == 12 for g in fp32 for c in g)
    with pytest.raises(ValueError, match="dtype"):
        LLMEngine(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="rollout_dtype"):
        GRPOConfig(rollout_dtype="fp16")


def test_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch, capsys):
    """precision / rollout_dtype bf16 on a CPU without native bf16 matmuls: one warning per field;
    none with native support, none on an unknown CPU, none for CUDA."""
    from reasonrl.train import common

    cpu = torch.device("cpu")
    for has, want in ((True, 0), (None, 0), (False, 1)):
        monkeypatch.setattr(common, "cpu_has_bf16_matmul", lambda has=has: has)
        monkeypatch.setattr(common, "_warned_bf16", set())
        common.warn_if_slow_bf16(cpu, "precision")
        common.warn_if_slow_bf16(cpu, "precision")
        common.warn_if_slow_bf16(torch.device("cuda"), "rollout_dtype")
        out = capsys.readouterr().out
        assert out.count("warning: precision bf16 on a CPU without AVX512-BF16") == want, (has, out)
        assert "rollout_dtype" not in out
    assert common.cpu_has_bf16_matmul() in (True, False, None)
