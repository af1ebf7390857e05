"""A random decode step for the lean-decode tests: a tiny model of one family with non-trivial norms
and biases, and 9 rows of ids, positions, slots, context lengths and block tables over a random cache."""
import torch

from reasonrl.models import ModelConfig, init_model

V = 61


def decode_case(arch: str, dtype: torch.dtype, seed: int, pad_row: int | None = None):
    """-> model, ids, pos, slots, lens, tables, kv (2 layers, 2 = k/v, blocks, block size, kv heads, D).
    pad_row: that row's slot is -1 (a padding row, writes nothing)."""
    cfg = ModelConfig(arch=arch, vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=arch == "qwen2",
                      attention_bias=arch != "llama", qk_norm=arch == "qwen3")
    model = init_model(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype)
    B, bs, NB = 9, 4, 80
    lens = torch.randint(1, 30, (B,), dtype=torch.int32)
    tables = torch.randperm(NB)[: B * 8].view(B, 8).int()
    pos = lens.long() - 1
    slots = tables.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs
    if pad_row is not None:
        slots[pad_row] = -1
    ids = torch.randint(0, V, (B,))
    kv = torch.randn(2, 2, NB, bs, 2, 16).to(dtype)
    return model, ids, pos, slots, lens, tables, kv
