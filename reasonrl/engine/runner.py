"""Runs the model for one scheduled step: builds the attention metadata, owns the KV cache.

The KV cache is one tensor (L, 2, num_blocks, block_size, Hkv, D), so that copying a block for
copy on write is one indexing op over every layer. Prefill packs the new tokens of each sequence
(cu_seqlens) and writes their k/v through slot_mapping; decode feeds each sequence's last token.
On CUDA, decode steps replay CUDA graphs captured lazily per padded batch size; on CPU they never
touch torch.cuda. Eager decode steps of a dense CausalLM run decode_forward.LeanDecode (the model's
own ops without module calls; on CPU one C++ call for the layers, final norm and LM head, equal to the
model's forward up to float32 summation order in RMSNorm).
decode_step takes device tensors (ids, positions, block tables) and derives slots and context
lengths itself, for the engine's multi-step decode windows.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from reasonrl.engine.block_manager import BlockManager
from reasonrl.engine.decode_forward import lean_decode
from reasonrl.engine.sequence import Sequence
from reasonrl.models.context import AttnContext
from reasonrl.ops.paged import empty_kv_cache

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
GRAPH_REUSE_ROWS = 64  # a captured graph of up to this many rows serves any smaller batch (Runner._graph_rows)


def _cpp_paged(dtype) -> bool:
    from reasonrl.ops.paged import _CPP_FLOATS, _resolve
    try:
        return dtype in _CPP_FLOATS and _resolve("auto", torch.device("cpu"), "paged_attention_decode",
                                                 "paged_attention_decode_fwd") == "cpp"
    except RuntimeError:
        return False


def _triton_paged(device) -> bool:
    from reasonrl.ops.paged import _resolve
    try:
        return (_resolve("auto", device, "store_kv", "store_kv_fwd") == "triton"
                and _resolve("auto", device, "paged_attention_decode", "paged_attention_decode_fwd") == "triton")
    except RuntimeError:
        return False


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * model.head_dim * dtype.itemsize


class Runner:
    def __init__(self, model, num_blocks: int, block_size: int, max_blocks_per_seq: int,
                 max_num_seqs: int, use_cuda_graphs: bool = True):
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.config
        self.block_size, self.max_blocks = block_size, max_blocks_per_seq
        shape = (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, model.head_dim)
        # NOTE: torch.zeros of the tiny model's 20 MiB cache cost 1-10 ms per rollout on CPU (loaded
        # machine). The C++ CPU kernels read only written slots (positions < context length); the
        # reference and GPU paths may read a whole block, so they get zeros (0 * garbage can be NaN).
        # On CPU the cache gets its own mapping on transparent huge pages (ops.paged.empty_kv_cache).
        if self.device.type == "cpu" and _cpp_paged(self.dtype):
            self.kv = empty_kv_cache(shape, self.dtype)  # (L, 2, NB, bs, Hkv, D)
        else:
            self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(cfg.num_hidden_layers)]
        # MoE models read routing counts on the host: no graphs (CausalLM.supports_cuda_graphs)
        # and only where the paged ops run as Triton kernels: their reference fallback (no Triton, or
        # TRITON_INTERPRET=1) indexes with masks, a host sync that a stream capture refuses
        self.use_graphs = (use_cuda_graphs and self.device.type == "cuda" and getattr(model, "supports_cuda_graphs", True)
                           and _triton_paged(self.device))
        self.lean = lean_decode(model)  # eager decode steps without the module machinery, or None
        self.graphs: dict[int, tuple] = {}
        self.graph_pool = None
        self.capture_s = 0.0  # wall time spent capturing (engine.stats["graph_capture_s"])
        self.max_graph_bs = max(b for b in GRAPH_BATCH_SIZES if b <= max(max_num_seqs, 1)) if self.use_graphs else 0

    @property
    def kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def free(self):
        self.graphs.clear()
        self.graph_pool = None
        self.kv_caches, self.kv = [], None

    def copy_blocks(self, copies: list[tuple[int, int]]):
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.kv[:, :, dst] = self.kv[:, :, src]

    def _upload(self, *cols):
        """Host int lists -> device int64 tensors with one host -> device copy."""
        flat = torch.tensor([x for c in cols for x in c], dtype=torch.int64)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        return flat.split([len(c) for c in cols])

    # -- prefill -----------------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence], bm: BlockManager) -> torch.Tensor:
        """seqs: those with tokens to compute (leaders / recomputed), each from its num_cached_tokens
        on (the blocks of a cached common prefix before them: the attention reads those keys back
        from the cache). -> logits of each sequence's last token (len(seqs), V) float32."""
        ids, pos, slots, cu, last = [], [], [], [0], []
        for seq in seqs:
            c, n = seq.num_cached_tokens, len(seq)
            ids.extend(seq.token_ids[c:])
            pos.extend(range(c, n))
            slots.extend(bm.slot(seq, p) for p in range(c, n))
            cu.append(cu[-1] + n - c)
            last.append(cu[-1] - 1)
        cached = any(s.num_cached_tokens for s in seqs)
        lens = [len(s) for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        tables = [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))] if cached else []
        ids, pos, slots, cu, last, lens, tables = self._upload(ids, pos, slots, cu, last, lens, tables)
        ctx = AttnContext(cu_seqlens=cu.int(), max_seqlen=max(len(s) - s.num_cached_tokens for s in seqs),
                          is_prefill=True, slot_mapping=slots, kv_caches=self.kv_caches,
                          block_tables=tables.view(len(seqs), width).int() if cached else None,
                          context_lens=lens.int() if cached else None)
        hidden = self.model(ids, pos, ctx)  # (total, H)
        return self.model.compute_logits(hidden[last]).float()

    # -- decode ------------------------------------------------------------------------------
    def _decode_inputs(self, seqs: list[Sequence], bm: BlockManager, rows: int):
        """Device tensors padded to `rows`: padding rows write nowhere and read one slot of block 0."""
        n = len(seqs)
        pad = rows - n
        ids = [s.token_ids[-1] for s in seqs] + [0] * pad
        pos = [len(s) - 1 for s in seqs] + [0] * pad
        slots = [bm.slot(s, len(s) - 1) for s in seqs] + [-1] * pad
        lens = [len(s) for s in seqs] + [1] * pad
        width = self.max_blocks if self.use_graphs else max(len(s.block_table) for s in seqs)
        tables = [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))] + [0] * (width * pad)
        ids, pos, slots, lens, tables = self._upload(ids, pos, slots, lens, tables)
        return ids, pos, slots, lens.int(), tables.view(rows, width).int()

    def decode(self, seqs: list[Sequence], bm: BlockManager) -> torch.Tensor:
        n = len(seqs)
        rows = self._graph_rows(n)
        return self._forward_decode(*self._decode_inputs(seqs, bm, rows or n), n)

    def decode_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """(B, width) int32 block tables on the device, for decode_step (graphs read max_blocks columns)."""
        width = self.max_blocks if self.use_graphs else max(len(s.block_table) for s in seqs)
        flat = [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))]
        return self._upload(flat)[0].view(len(seqs), width).int()

    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """One decode step from device tensors: ids, pos (B,) int64, tables (B, width) int32 that
        already hold the slot of every position. Slots and context lengths are derived here, so a
        window of steps never goes back to the Python sequences. -> logits (B, V): float32, or under
        CUDA graphs the model's dtype in the graph's buffer (read them before the next step)."""
        bs = self.block_size
        slots = tables.gather(1, (pos // bs)[:, None]).squeeze(1).long() * bs + pos % bs  # (B,)
        lens = (pos + 1).int()
        n = ids.shape[0]
        rows = self._graph_rows(n)
        if rows and rows > n:
            pad = rows - n
            ids, pos = F.pad(ids, (0, pad)), F.pad(pos, (0, pad))
            slots, lens = F.pad(slots, (0, pad), value=-1), F.pad(lens, (0, pad), value=1)
            tables = F.pad(tables, (0, 0, 0, pad))
        return self._forward_decode(ids, pos, slots, lens, tables, n)

    def decode_window(self, ids, pos, tables, temperature, u, stop, k):
        """k decode steps with their sampling in one call where the model's lean CPU path has it
        (LeanDecode.window), else None."""
        if self.lean is None or self._graph_rows(ids.shape[0]):
            return None
        return self.lean.window(ids, pos, tables, self.block_size, self.kv_caches, temperature, u, stop, k)

    def _graph_rows(self, n: int) -> int:
        """The captured batch size that runs n rows, or 0 for eager: a graph already captured in this
        call where it has at most max(2n, GRAPH_REUSE_ROWS) rows, else the next size of
        GRAPH_BATCH_SIZES (captured on first use). Why: as the sequences of a rollout finish, the batch
        walks down the sizes (64 samples with EOS: up to 9 captures per generate() call, each a warm-up
        step, a capture and two syncs), while a decode step of up to a few dozen rows costs about the
        same at any row count (it reads every weight once; padding rows read one key and write nowhere).
        NOTE: not yet timed on a GPU; engine.stats["graph_capture_s"] shows the capture time per call."""
        if not self.use_graphs or n > self.max_graph_bs:
            return 0
        reuse = [b for b in self.graphs if n <= b <= max(2 * n, GRAPH_REUSE_ROWS)]
        return min(reuse) if reuse else next(b for b in GRAPH_BATCH_SIZES if b >= n)

    def _forward_decode(self, ids, pos, slots, lens, tables, n) -> torch.Tensor:
        """Inputs padded to a graph size when graphs run (padding rows write nowhere, read block 0)."""
        rows = ids.shape[0]
        if self._graph_rows(n):
            if rows not in self.graphs:
                self._capture(rows)
            graph, buf, out = self.graphs[rows]
            for name, t in zip(("ids", "pos", "slots", "lens", "tables"), (ids, pos, slots, lens, tables)):
                buf[name].copy_(t)
            graph.replay()
            # in the model's dtype, a view of the graph's output buffer: valid until the next replay (the
            # sampler reads it first, in stream order; a float32 copy was one more pass over B x V a step)
            return out[:n]
        if self.lean is not None:
            return self.lean(ids, pos, slots, lens, tables, self.kv_caches).float()
        ctx = AttnContext(cu_seqlens=torch.arange(rows + 1, dtype=torch.int32, device=self.device), max_seqlen=1,
                          is_prefill=False, slot_mapping=slots, block_tables=tables, context_lens=lens,
                          kv_caches=self.kv_caches)
        hidden = self.model(ids, pos, ctx)  # (B, H)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def _capture(self, rows: int):
        # NOTE: graphs hold the KV cache's addresses, and the engine frees the cache after each
        # generate(), so every call captures again (once per batch size it reaches).
        t0 = time.perf_counter()
        dev = self.device
        buf = {"ids": torch.zeros(rows, dtype=torch.int64, device=dev),
               "pos": torch.zeros(rows, dtype=torch.int64, device=dev),
               "slots": torch.full((rows,), -1, dtype=torch.int64, device=dev),
               "lens": torch.ones(rows, dtype=torch.int32, device=dev),
               "tables": torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=dev)}
        ctx = AttnContext(cu_seqlens=torch.arange(rows + 1, dtype=torch.int32, device=dev), max_seqlen=1,
                          is_prefill=False, slot_mapping=buf["slots"], block_tables=buf["tables"],
                          context_lens=buf["lens"], kv_caches=self.kv_caches)

        def step():
            if self.lean is not None and self.lean.triton:  # kernels/decode.py between the GEMMs
                return self.lean(buf["ids"], buf["pos"], buf["slots"], buf["lens"], buf["tables"], self.kv_caches)
            return self.model.compute_logits(self.model(buf["ids"], buf["pos"], ctx))

        step()  # warm up (Triton autotuning / compilation happens outside the capture)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = step()
        self.graph_pool = graph.pool()
        torch.cuda.synchronize()
        self.graphs[rows] = (graph, buf, out)
        self.capture_s += time.perf_counter() - t0
