// CUDA kernels of the log-prob family (raw pointers, no torch headers; launchers take the stream).
//
// Per row, z = x * inv_t; work in base 2 with c = inv_t * log2(e) so each exponential is one
// exp2f (ex2.approx):
//   forward  one block per row, one pass over the row. Each thread keeps an online triple over its
//            columns: m (max of raw x), s = sum 2^d, t = sum 2^d d with d = (x - m) c <= 0; when the
//            max grows from m to m', s *= a and t = a (t + dm s), a = 2^dm, dm = (m - m') c.
//            Triples merge by the same rule (warp shuffles, then shared memory across warps).
//            logp = (x_id - m) inv_t - ln2 log2 s,  entropy = lse - sum p z = ln2 (log2 s - t / s),
//            saved: lse = (m, ln2 log2 s), the log-sum-exp m inv_t + log s as two floats (one float32
//            rounds it by 5e-4 near 1e4, an error every p of the row would carry; csrc/reasonrl.h).
//   backward p = 2^((x - m) c - log2 s), d = (x - m) inv_t, k = log s - entropy,
//            grad_x = inv_t (g (1[j + vocab_start == id] - p) + gh p (k - d))   (k - d = lse - entropy - z).
//            Grid (rows, column splits): few rows get split over several blocks to fill the GPU.
// The logits are read once by the forward and once by the backward, the gradient written once
// (possibly over the logits: each thread loads its 16 bytes before it stores them): the byte floor
// of three passes. Nothing of size V is materialized.
// NOTE: H200, N=16384, V=151936, bf16: fwd 1.08 ms (4.6 TB/s read), bwd 2.51 ms (4.0 TB/s), fwd+bwd
// in place 3.62 ms vs a 3.54 ms floor (three passes at the 4.22 TB/s device copy rate measured in
// the same run); eager PyTorch 32.0 ms with 27.8 GiB extra.
// Loads/stores are 16 bytes wide from the first 16-byte boundary of each row (a few scalar elements
// before it and after the last full vector), so any row stride and offset works.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "grpo.h"
#include "reasonrl.h"

namespace reasonrl {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <DType D>
struct Traits;
template <>
struct Traits<DType::f32> {
  using T = float;
  static constexpr int kVec = 4;  // elements per 16 bytes
  __device__ static float to_f(float v) { return v; }
  __device__ static float from_f(float f) { return f; }
};
template <>
struct Traits<DType::bf16> {
  using T = unsigned short;
  static constexpr int kVec = 8;
  __device__ static float to_f(unsigned short v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
  __device__ static unsigned short from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
template <>
struct Traits<DType::f16> {
  using T = unsigned short;
  static constexpr int kVec = 8;
  __device__ static float to_f(unsigned short v) { return __half2float(__ushort_as_half(v)); }
  __device__ static unsigned short from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <typename T, int K>
union Pack {
  uint4 raw;
  T e[K];
};

// Elements before the row's first 16-byte boundary (capped at V).
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* row, int64_t V) {
  const int64_t h = ((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / sizeof(T);
  return h < V ? h : V;
}

// ---- forward --------------------------------------------------------------------------------------
struct State {
  float m, s, t;  // max of raw x; sum 2^d; sum 2^d d  (d = (x - m) c)
};

template <bool Ent>
__device__ __forceinline__ void absorb(State& st, const float* v, int n, float c) {
  float mk = v[0];
#pragma unroll
  for (int k = 1; k < n; ++k) mk = fmaxf(mk, v[k]);  // fmaxf skips NaN; d below carries it
  if (mk > st.m) {
    if (st.s != 0.f) {  // s == 0: nothing absorbed yet (m = -inf); s NaN: keep it NaN
      const float dm = (st.m - mk) * c;
      const float a = exp2f(dm);
      // a = 0 (the old max far below: masks at finfo.min) leaves nothing of the old terms; dm * s would
      // overflow to -inf there and 0 * -inf made the entropy NaN
      if (Ent) st.t = a > 0.f ? a * (st.t + dm * st.s) : 0.f;
      st.s *= a;
    }
    st.m = mk;
  }
  if (st.m == -INFINITY) {  // only -inf (or NaN) so far: exp2(-inf - -inf) would be NaN
    bool nan = false;
#pragma unroll
    for (int k = 0; k < n; ++k) nan |= isnan(v[k]);
    if (nan) st.s = NAN;
    return;
  }
#pragma unroll
  for (int k = 0; k < n; ++k) {
    const float d = (v[k] - st.m) * c;
    const float e = exp2f(d);
    st.s += e;
    if (Ent) st.t += e > 0.f ? e * d : 0.f;  // -inf logit: e = 0, d = -inf
  }
}

template <bool Ent>
__device__ __forceinline__ void merge(State& a, const State& b, float c) {
  const float M = fmaxf(a.m, b.m);
  if (M == -INFINITY) {  // both hold only -inf / NaN
    a.s = (isnan(a.s) || isnan(b.s)) ? NAN : 0.f;
    return;
  }
  const float da = (a.m - M) * c, db = (b.m - M) * c;  // <= 0, -inf for an empty side
  const float ea = a.s != 0.f ? exp2f(da) : 0.f, eb = b.s != 0.f ? exp2f(db) : 0.f;
  if (Ent) {
    const float ta = (a.s != 0.f && ea > 0.f) ? ea * (a.t + da * a.s) : 0.f;  // ea = 0: see absorb
    const float tb = (b.s != 0.f && eb > 0.f) ? eb * (b.t + db * b.s) : 0.f;
    a.t = ta + tb;
  }
  a.s = (a.s != 0.f ? ea * a.s : 0.f) + (b.s != 0.f ? eb * b.s : 0.f);
  a.m = M;
}

// Merges the triples of a warp's lanes (butterfly: every lane ends with the warp's triple).
template <bool Ent>
__device__ __forceinline__ void warp_merge(State& st, float c) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    State o{__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
            __shfl_xor_sync(0xffffffffu, st.t, off)};
    merge<Ent>(st, o, c);
  }
}

// Absorbs the elements of one or two 16-byte packs.
template <typename Tr, bool Ent, typename P>
__device__ __forceinline__ void absorb_packs(State& st, const P& p0, const P& p1, float c) {
  constexpr int K = Tr::kVec;
  float v[2 * K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = Tr::to_f(p0.e[k]);
    v[K + k] = Tr::to_f(p1.e[k]);
  }
  absorb<Ent>(st, v, 2 * K, c);
}

template <typename Tr, bool Ent, typename P>
__device__ __forceinline__ void absorb_pack(State& st, const P& p0, float c) {
  constexpr int K = Tr::kVec;
  float v[K];
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = Tr::to_f(p0.e[k]);
  absorb<Ent>(st, v, K, c);
}

template <DType D, bool Ent>
__global__ void logprob_fwd_kernel(float* __restrict__ logp, float* __restrict__ lse,
                                   float* __restrict__ entropy, const void* __restrict__ x,
                                   int64_t stride_x, const int64_t* __restrict__ ids, int64_t V,
                                   float inv_t, int64_t ignore_index) {
  using Tr = Traits<D>;
  using T = typename Tr::T;
  constexpr int K = Tr::kVec;
  const int64_t r = blockIdx.x;
  const T* row = static_cast<const T*>(x) + r * stride_x;  // V elements
  const float c = inv_t * kLog2e;
  State st{-INFINITY, 0.f, 0.f};

  const int64_t h = head_len(row, V);
  const int64_t nvec = (V - h) / K;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + h);
  int64_t i = threadIdx.x;
  // Two 16-byte loads in flight per thread per trip.
  for (; i + blockDim.x < nvec; i += 2 * blockDim.x) {
    Pack<T, K> p0, p1;
    p0.raw = __ldg(vrow + i);
    p1.raw = __ldg(vrow + i + blockDim.x);
    absorb_packs<Tr, Ent>(st, p0, p1, c);
  }
  if (i < nvec) {
    Pack<T, K> p0;
    p0.raw = __ldg(vrow + i);
    absorb_pack<Tr, Ent>(st, p0, c);
  }
  // scalar head [0, h) and tail [h + nvec K, V): fewer than 2 K elements each
  const int64_t tail = h + nvec * K;
  for (int64_t j = threadIdx.x; j < h + (V - tail); j += blockDim.x) {
    const int64_t col = j < h ? j : tail + (j - h);
    const float v = Tr::to_f(row[col]);
    absorb<Ent>(st, &v, 1, c);
  }

  // block reduction: warps by shuffles, then warp 0 over the per-warp results
  __shared__ State smem[32];
  warp_merge<Ent>(st, c);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  const int nwarps = blockDim.x / 32;
  st = lane < nwarps ? smem[lane] : State{-INFINITY, 0.f, 0.f};
  warp_merge<Ent>(st, c);
  if (lane != 0) return;
  const float log2s = log2f(st.s);
  lse[2 * r] = st.m;
  lse[2 * r + 1] = kLn2 * log2s;
  const int64_t id = ids[r];
  const bool keep = id != ignore_index;
  // ids are checked on the host side (Python); an id out of range still never reads outside the row
  const bool in_range = id >= 0 && id < V;
  logp[r] = keep ? (in_range ? (Tr::to_f(row[id]) - st.m) * inv_t - kLn2 * log2s : NAN) : 0.f;
  if (Ent) entropy[r] = keep ? kLn2 * (log2s - st.t / st.s) : 0.f;
}

// ---- backward -------------------------------------------------------------------------------------
// The row's constants of the gradient: its lse (m, log2 s), c = inv_t log2 e, k = log s - entropy.
struct RowLse {
  float m, log2s, c, inv_t, k;
};

template <bool Ent>
__device__ __forceinline__ float grad_elem(float x, int64_t j, int64_t target, const RowLse& q, float g,
                                           float gh) {
  const float dx = x - q.m;  // exact wherever p matters: x within a factor 2 of the max
  const float p = exp2f(fmaf(dx, q.c, -q.log2s));
  float dz = (j == target ? g : 0.f) - g * p;
  if (Ent) {
    const float pz = p * (q.k - dx * q.inv_t);
    dz += gh * (p == 0.f ? 0.f : pz);  // -inf logit: p = 0, k - d = inf
  }
  return dz;
}

template <DType D, bool Ent>
__global__ void logprob_bwd_kernel(void* grad_x, int64_t stride_g, const void* x, int64_t stride_x,
                                   const int64_t* __restrict__ ids, const float* __restrict__ lse,
                                   const float* __restrict__ entropy,
                                   const float* __restrict__ grad_logp,
                                   const float* __restrict__ grad_entropy, int64_t V,
                                   int64_t vocab_start, float inv_t, int64_t ignore_index) {
  using Tr = Traits<D>;
  using T = typename Tr::T;
  constexpr int K = Tr::kVec;
  // No __restrict__ on x / grad_x: they may be one buffer (in-place backward).
  const int64_t r = blockIdx.x;
  const T* xr = static_cast<const T*>(x) + r * stride_x;  // Vc elements
  T* gr = static_cast<T*>(grad_x) + r * stride_g;
  const int64_t id = ids[r];
  const bool keep = id != ignore_index;
  const int64_t target = keep ? id - vocab_start : -1;
  const float ls = lse[2 * r + 1];
  const RowLse q{lse[2 * r], ls * kLog2e, inv_t * kLog2e, inv_t, Ent ? ls - entropy[r] : 0.f};
  const float g = keep ? grad_logp[r] * inv_t : 0.f;  // 1/T folded into the row constants
  const float gh = (Ent && keep) ? grad_entropy[r] * inv_t : 0.f;

  const int64_t h = head_len(xr, V);
  // 16-byte vectors need the same misalignment on both sides; else all scalar (still coalesced).
  const bool vec = head_len(gr, V) == h;
  const int64_t nvec = vec ? (V - h) / K : 0;
  const int64_t tail = vec ? h + nvec * K : 0;  // scalar columns: [0, h) and [tail, V)
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;

  for (int64_t i = first; i < nvec; i += step) {
    Pack<T, K> in, out;
    in.raw = reinterpret_cast<const uint4*>(xr + h)[i];
    const int64_t j0 = h + i * K;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float dz = keep ? grad_elem<Ent>(Tr::to_f(in.e[k]), j0 + k, target, q, g, gh) : 0.f;
      out.e[k] = Tr::from_f(dz);
    }
    reinterpret_cast<uint4*>(gr + h)[i] = out.raw;
  }
  const int64_t nscalar = vec ? h + (V - tail) : V;
  for (int64_t j = first; j < nscalar; j += step) {
    const int64_t col = (!vec || j < h) ? j : tail + (j - h);
    const float dz = keep ? grad_elem<Ent>(Tr::to_f(xr[col]), col, target, q, g, gh) : 0.f;
    gr[col] = Tr::from_f(dz);
  }
}

// ---- GRPO from logits: one pass per row (grpo_logits; formulas: reasonrl/ops/grpo.py) -------------
// One block per row of logits, for the token-level loss, whose d loss / d logp of a token is known as
// soon as its log-prob is (csrc/grpo.h, grpo_token_coefs): the block reads the row (the forward's
// online triple), reduces it, computes logp, entropy and the token's coefficients, then reads the row
// again and writes its gradient (in place or to grad_x). The second read does not go to DRAM: the
// first `stage` 16-byte vectors of the row are kept in shared memory by the first read, and the rest
// is read back in reverse order, so the part read last comes back first, from L2 (the first read
// loads staged vectors with evict-first hints, the gradient is stored with them too, so L2 keeps the
// unstaged rest). DRAM traffic: one read and one write of the logits instead of the two reads and one
// write of a forward kernel plus a backward kernel. Each thread reads back only the vectors it read
// (vector i belongs to thread i mod blockDim in both passes), so in place is safe as in the backward.
template <DType D, bool EntF, bool EntB>
__global__ void __launch_bounds__(1024)
grpo_logits_kernel(void* grad_x, int64_t sgb, int64_t sgt, const void* x, int64_t sxb, int64_t sxt,
                   int64_t T, int64_t V, const int64_t* __restrict__ ids, float* __restrict__ logp_out,
                   float* __restrict__ ent_out, const float* __restrict__ rewards,
                   const float* __restrict__ scale, const float* __restrict__ old,
                   const float* __restrict__ ref, GRPOParams p, float inv_t, int64_t stage) {
  using Tr = Traits<D>;
  using E = typename Tr::T;
  constexpr int K = Tr::kVec;
  extern __shared__ uint4 staged[];  // `stage` vectors of the row
  __shared__ State red[32];
  __shared__ float bc[2];
  __shared__ RowLse bq;
  const int64_t r = blockIdx.x, b = r / T, t = r - b * T;
  // No __restrict__ on x / grad_x: they may be one buffer (in place).
  const E* xr = static_cast<const E*>(x) + b * sxb + t * sxt;
  E* gr = static_cast<E*>(grad_x) + b * sgb + t * sgt;
  const int64_t id = ids[r];
  const int64_t h0 = head_len(xr, V);
  const bool vec = head_len(gr, V) == h0;  // same misalignment on both sides; else all scalar
  const int64_t nvec = vec ? (V - h0) / K : 0;
  const int64_t hs = vec ? h0 : V;                // scalar columns: [0, hs) and [tail, V)
  const int64_t tail = vec ? h0 + nvec * K : V;
  const int64_t nscalar = hs + (V - tail);
  const int64_t nst = stage < nvec ? stage : nvec;
  const uint4* vx = reinterpret_cast<const uint4*>(xr + h0);
  uint4* vg = reinterpret_cast<uint4*>(gr + h0);
  const int64_t bd = blockDim.x;

  if (id == -100) {  // masked token: no log-prob, a zero gradient row (uniform over the block)
    Pack<E, K> z;
#pragma unroll
    for (int k = 0; k < K; ++k) z.e[k] = Tr::from_f(0.f);
    for (int64_t i = threadIdx.x; i < nvec; i += bd) __stcs(vg + i, z.raw);
    for (int64_t j = threadIdx.x; j < nscalar; j += bd) gr[j < hs ? j : tail + (j - hs)] = Tr::from_f(0.f);
    if (threadIdx.x == 0) {
      logp_out[r] = 0.f;
      if (EntF) ent_out[r] = 0.f;
    }
    return;
  }

  // pass 1: the online triple over the row; vectors [0, nst) kept in shared memory
  const float c = inv_t * kLog2e;
  State st{-INFINITY, 0.f, 0.f};
  int64_t i = threadIdx.x;
  for (; i + bd < nvec; i += 2 * bd) {
    Pack<E, K> p0, p1;
    p0.raw = i < nst ? __ldcs(vx + i) : vx[i];
    p1.raw = i + bd < nst ? __ldcs(vx + i + bd) : vx[i + bd];
    if (i < nst) staged[i] = p0.raw;
    if (i + bd < nst) staged[i + bd] = p1.raw;
    absorb_packs<Tr, EntF>(st, p0, p1, c);
  }
  if (i < nvec) {
    Pack<E, K> p0;
    p0.raw = i < nst ? __ldcs(vx + i) : vx[i];
    if (i < nst) staged[i] = p0.raw;
    absorb_pack<Tr, EntF>(st, p0, c);
  }
  for (int64_t j = threadIdx.x; j < nscalar; j += bd) {
    const float v = Tr::to_f(xr[j < hs ? j : tail + (j - hs)]);
    absorb<EntF>(st, &v, 1, c);
  }

  // block reduction (as the forward kernel), then lane 0 of warp 0 makes the row's constants
  warp_merge<EntF>(st, c);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = st;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    st = lane < nwarps ? red[lane] : State{-INFINITY, 0.f, 0.f};
    warp_merge<EntF>(st, c);
    if (lane == 0) {
      const float log2s = log2f(st.s);
      // ids are range-checked by the caller (deferred); an id out of range never reads outside the row
      const bool in_range = id >= 0 && id < V;
      const float lp = in_range ? (Tr::to_f(xr[id]) - st.m) * inv_t - kLn2 * log2s : NAN;
      const float H = EntF ? kLn2 * (log2s - st.t / st.s) : 0.f;
      logp_out[r] = lp;
      if (EntF) ent_out[r] = H;
      bool zero_std;
      const float A = grpo_advantage(rewards, b, p, &zero_std);
      float g, gh;
      grpo_token_coefs(lp, old ? old + r : nullptr, ref ? ref + r : nullptr, A, scale[b], p, &g, &gh);
      bq = RowLse{st.m, log2s, c, inv_t, EntB ? kLn2 * log2s - H : 0.f};
      bc[0] = g * inv_t;  // 1/T folded into the row constants, as in the backward kernel
      bc[1] = EntB ? gh * inv_t : 0.f;
    }
  }
  __syncthreads();
  const RowLse q = bq;
  const float g = bc[0], gh = bc[1];

  // pass 2, in reverse: this thread's vectors i = threadIdx.x + k * bd for k descending, two at a time
  if (threadIdx.x < nvec) {
    int64_t k = (nvec - 1 - threadIdx.x) / bd;
    for (; k >= 1; k -= 2) {
      const int64_t i0 = threadIdx.x + k * bd, i1 = i0 - bd;
      Pack<E, K> a0, a1, o0, o1;
      a0.raw = i0 < nst ? staged[i0] : vx[i0];
      a1.raw = i1 < nst ? staged[i1] : vx[i1];
      const int64_t j0 = h0 + i0 * K, j1 = h0 + i1 * K;
#pragma unroll
      for (int e = 0; e < K; ++e) {
        o0.e[e] = Tr::from_f(grad_elem<EntB>(Tr::to_f(a0.e[e]), j0 + e, id, q, g, gh));
        o1.e[e] = Tr::from_f(grad_elem<EntB>(Tr::to_f(a1.e[e]), j1 + e, id, q, g, gh));
      }
      __stcs(vg + i0, o0.raw);
      __stcs(vg + i1, o1.raw);
    }
    if (k == 0) {
      const int64_t i0 = threadIdx.x;
      Pack<E, K> a0, o0;
      a0.raw = i0 < nst ? staged[i0] : vx[i0];
      const int64_t j0 = h0 + i0 * K;
#pragma unroll
      for (int e = 0; e < K; ++e)
        o0.e[e] = Tr::from_f(grad_elem<EntB>(Tr::to_f(a0.e[e]), j0 + e, id, q, g, gh));
      __stcs(vg + i0, o0.raw);
    }
  }
  for (int64_t j = threadIdx.x; j < nscalar; j += bd) {
    const int64_t col = j < hs ? j : tail + (j - hs);
    gr[col] = Tr::from_f(grad_elem<EntB>(Tr::to_f(xr[col]), col, id, q, g, gh));
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

int fwd_threads(int64_t V) { return V >= (int64_t{1} << 15) ? 512 : V >= 4096 ? 256 : 128; }

int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // cleared: a later check_launch (or torch's) would blame a kernel for it
    return 132;
  }
  return sms;
}

template <bool Ent>
void launch_fwd(float* logp, float* lse, float* entropy, const void* x, DType dtype, int64_t stride_x,
                const int64_t* ids, int64_t N, int64_t V, float inv_t, int64_t ignore_index,
                cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(N)), block(fwd_threads(V));
  switch (dtype) {
    case DType::f32:
      logprob_fwd_kernel<DType::f32, Ent><<<grid, block, 0, stream>>>(logp, lse, entropy, x, stride_x,
                                                                       ids, V, inv_t, ignore_index);
      break;
    case DType::bf16:
      logprob_fwd_kernel<DType::bf16, Ent><<<grid, block, 0, stream>>>(logp, lse, entropy, x, stride_x,
                                                                        ids, V, inv_t, ignore_index);
      break;
    case DType::f16:
      logprob_fwd_kernel<DType::f16, Ent><<<grid, block, 0, stream>>>(logp, lse, entropy, x, stride_x,
                                                                       ids, V, inv_t, ignore_index);
      break;
  }
}

template <bool Ent>
void launch_bwd(void* grad_x, int64_t stride_g, const void* x, DType dtype, int64_t stride_x,
                const int64_t* ids, const float* lse, const float* entropy, const float* grad_logp,
                const float* grad_entropy, int64_t N, int64_t V, int64_t vocab_start, float inv_t,
                int64_t ignore_index, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int K = dtype == DType::f32 ? 4 : 8;
  // Split rows over several blocks only when there are too few rows to fill the GPU.
  const int64_t per_block = int64_t{kThreads} * K * 4;  // at least 4 vectors per thread
  const int64_t max_split = (V + per_block - 1) / per_block;
  const int64_t want = (int64_t{4} * num_sms() + N - 1) / N;
  const int64_t split = std::max<int64_t>(1, std::min<int64_t>({want, max_split, 65535}));
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(split)), block(kThreads);
#define RR_BWD_LAUNCH(DT)                                                                     \
  logprob_bwd_kernel<DT, Ent><<<grid, block, 0, stream>>>(grad_x, stride_g, x, stride_x, ids, \
                                                           lse, entropy, grad_logp,           \
                                                           grad_entropy, V, vocab_start,      \
                                                           inv_t, ignore_index)
  switch (dtype) {
    case DType::f32: RR_BWD_LAUNCH(DType::f32); break;
    case DType::bf16: RR_BWD_LAUNCH(DType::bf16); break;
    case DType::f16: RR_BWD_LAUNCH(DType::f16); break;
  }
#undef RR_BWD_LAUNCH
}

template <DType D, bool EntF, bool EntB>
void launch_grpo_logits(void* grad_x, int64_t sgb, int64_t sgt, const void* x, int64_t sxb, int64_t sxt,
                        int64_t N, int64_t T, int64_t V, const int64_t* ids, float* logp, float* ent,
                        const float* rewards, const float* scale, const float* old, const float* ref,
                        const GRPOParams& p, float inv_t, int64_t stage_bytes, cudaStream_t stream) {
  auto kernel = grpo_logits_kernel<D, EntF, EntB>;
  // The opt-in shared memory limit is a property of the device, and raising a kernel's limit acts on
  // the current device only: both are looked up per call (cheap), the kernel's static part once.
  cudaFuncAttributes attr{};
  int dev = 0, optin = 0, per_sm = 0;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess) {
    const cudaError_t err = cudaGetLastError();  // cleared, and named (not cached: the next call asks again)
    throw std::runtime_error(std::string("grpo_logits_cuda: cannot query the device's shared memory: ") +
                             cudaGetErrorString(err));
  }
  const int static_smem = static_cast<int>(attr.sharedSizeBytes);
  const int64_t K = D == DType::f32 ? 4 : 8;
  const int64_t row_vecs = (V + K - 1) / K;
  const int64_t fit_one = (optin - static_smem) / 16;  // one block per SM
  const int64_t fit_two = (per_sm / 2 - 1024 - static_smem) / 16;  // two blocks per SM
  // Default: the whole row where it fits one block; where it does not (the rest is read back from L2
  // anyway), what lets two blocks share an SM, so that one streams while the other reduces its row.
  // H200, V = 151936 bf16 in place: kernel 2.66 ms at 112 KiB against 2.81 ms at 227 KiB (2026-11-27).
  const int64_t want = stage_bytes >= 0 ? std::min<int64_t>(row_vecs, stage_bytes / 16)
                       : row_vecs <= fit_one ? row_vecs : std::max<int64_t>(0, fit_two);
  const int64_t stage = std::max<int64_t>(0, std::min<int64_t>(want, fit_one));
  const int64_t dyn = stage * 16;
  if (dyn > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)) != cudaSuccess)
    throw std::runtime_error("grpo_logits_cuda: cannot raise the kernel's shared memory limit");
  // Where two blocks' shared memory (with the 1 KiB the hardware reserves for each) does not fit an
  // SM, one block runs per SM: make it 1024 threads (32 KiB of the first read in flight); else blocks
  // of 512, two per SM (64 registers a thread: two of 1024 would not fit the register file).
  const bool one_per_sm = 2 * (dyn + static_smem + 1024) > per_sm;
  const int threads = stage == 0 ? fwd_threads(V) : one_per_sm ? 1024 : 512;
  kernel<<<static_cast<unsigned>(N), threads, static_cast<size_t>(dyn), stream>>>(
      grad_x, sgb, sgt, x, sxb, sxt, T, V, ids, logp, ent, rewards, scale, old, ref, p, inv_t, stage);
}

}  // namespace

void logprob_fwd_cuda(float* logp, float* lse, float* entropy, const void* x, DType dtype,
                      int64_t stride_x, const int64_t* ids, int64_t N, int64_t V, float inv_t,
                      int64_t ignore_index, cudaStream_t stream) {
  if (N <= 0) return;
  if (N > 0x7fffffff) throw std::runtime_error("logprob_fwd_cuda: at most 2^31 - 1 rows");
  if (entropy != nullptr)
    launch_fwd<true>(logp, lse, entropy, x, dtype, stride_x, ids, N, V, inv_t, ignore_index, stream);
  else
    launch_fwd<false>(logp, lse, entropy, x, dtype, stride_x, ids, N, V, inv_t, ignore_index, stream);
  check_launch("logprob_fwd_cuda");
}

void logprob_bwd_cuda(void* grad_x, int64_t stride_g, const void* x, DType dtype, int64_t stride_x,
                      const int64_t* ids, const float* lse, const float* entropy,
                      const float* grad_logp, const float* grad_entropy, int64_t N, int64_t V,
                      int64_t vocab_start, float inv_t, int64_t ignore_index, cudaStream_t stream) {
  if (N <= 0) return;
  if (N > 0x7fffffff) throw std::runtime_error("logprob_bwd_cuda: at most 2^31 - 1 rows");
  if (grad_entropy != nullptr)
    launch_bwd<true>(grad_x, stride_g, x, dtype, stride_x, ids, lse, entropy, grad_logp, grad_entropy,
                     N, V, vocab_start, inv_t, ignore_index, stream);
  else
    launch_bwd<false>(grad_x, stride_g, x, dtype, stride_x, ids, lse, entropy, grad_logp, grad_entropy,
                      N, V, vocab_start, inv_t, ignore_index, stream);
  check_launch("logprob_bwd_cuda");
}

void grpo_logits_cuda(void* grad_x, int64_t stride_gb, int64_t stride_gt, const void* x,
                      int64_t stride_xb, int64_t stride_xt, DType dtype, int64_t V, const int64_t* ids,
                      float* logp, float* entropy, const float* rewards, const float* scale,
                      const float* old, const float* ref, const GRPOParams& p, float inv_t,
                      int64_t stage_bytes, cudaStream_t stream) {
  const int64_t N = p.B * p.T;
  if (N <= 0) return;
  if (N > 0x7fffffff) throw std::runtime_error("grpo_logits_cuda: at most 2^31 - 1 rows");
  const bool ent_f = entropy != nullptr, ent_b = p.entropy_coef != 0.f;
  if (ent_b && !ent_f) throw std::runtime_error("grpo_logits_cuda: an entropy bonus needs the entropy");
#define RR_GL_LAUNCH(DT, EF, EB)                                                                     \
  launch_grpo_logits<DT, EF, EB>(grad_x, stride_gb, stride_gt, x, stride_xb, stride_xt, N, p.T, V, ids, \
                                 logp, entropy, rewards, scale, old, ref, p, inv_t, stage_bytes, stream)
#define RR_GL_DTYPE(DT)                         \
  do {                                          \
    if (ent_b)                                  \
      RR_GL_LAUNCH(DT, true, true);             \
    else if (ent_f)                             \
      RR_GL_LAUNCH(DT, true, false);            \
    else                                        \
      RR_GL_LAUNCH(DT, false, false);           \
  } while (0)
  switch (dtype) {
    case DType::f32: RR_GL_DTYPE(DType::f32); break;
    case DType::bf16: RR_GL_DTYPE(DType::bf16); break;
    case DType::f16: RR_GL_DTYPE(DType::f16); break;
  }
#undef RR_GL_DTYPE
#undef RR_GL_LAUNCH
  check_launch("grpo_logits_cuda");
}


namespace {

template <DType D>
__global__ void __launch_bounds__(256) grpo_scale_grad_kernel(void* grad, int64_t sgb, int64_t sgt, int64_t T,
                                                              int64_t V, int64_t N, const float* scale) {
  using Tr = Traits<D>;
  using E = typename Tr::T;
  constexpr int K = Tr::kVec;
  const float s = *scale;
  if (s == 1.f) return;  // upstream 1: the forward's gradient stands (the usual case: no pass at all)
  E* base = static_cast<E*>(grad);
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    E* row = base + (r / T) * sgb + (r % T) * sgt;
    const int64_t h = head_len(row, V), nv = (V - h) / K;  // scalars to a 16-byte boundary, then packs
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) row[j] = Tr::from_f(Tr::to_f(row[j]) * s);
    uint4* vp = reinterpret_cast<uint4*>(row + h);
    for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
      Pack<E, K> p;
      p.raw = vp[j];
#pragma unroll
      for (int k = 0; k < K; ++k) p.e[k] = Tr::from_f(Tr::to_f(p.e[k]) * s);
      vp[j] = p.raw;
    }
    for (int64_t j = h + nv * K + threadIdx.x; j < V; j += blockDim.x) row[j] = Tr::from_f(Tr::to_f(row[j]) * s);
  }
}

}  // namespace

void grpo_scale_grad_cuda(void* grad, int64_t stride_gb, int64_t stride_gt, DType dtype, int64_t B, int64_t T,
                          int64_t V, const float* scale, cudaStream_t stream) {
  const int64_t N = B * T;
  if (N <= 0 || V <= 0) return;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    sms = 132;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(N, (int64_t)sms * 8));
  switch (dtype) {
    case DType::f32:
      grpo_scale_grad_kernel<DType::f32><<<blocks, 256, 0, stream>>>(grad, stride_gb, stride_gt, T, V, N, scale);
      break;
    case DType::bf16:
      grpo_scale_grad_kernel<DType::bf16><<<blocks, 256, 0, stream>>>(grad, stride_gb, stride_gt, T, V, N, scale);
      break;
    case DType::f16:
      grpo_scale_grad_kernel<DType::f16><<<blocks, 256, 0, stream>>>(grad, stride_gb, stride_gt, T, V, N, scale);
      break;
  }
  check_launch("grpo_scale_grad_cuda");
}

}  // namespace reasonrl
