// CUDA kernels of the MoE routing and permutation (raw pointers, no torch headers; launchers take
// the stream). The expert GEMMs run in Triton (kernels/moe.py); these produce what they consume.
//
// Router, one warp per token: s = softmax(z) (warp max, then sum of exp) or sigmoid(z), sel = s + bias
// kept in shared memory (double: see moe_router_kernel); K rounds of a warp arg-max over the experts not yet taken, ordered by
// (value desc, id asc): ties go to the lower expert id, as on the CPU and in the reference. A NaN
// score compares as -inf, so every row still gets K distinct ids.
//
// Dispatch, a stable counting sort of the N = T*K assignments a = t*K + k by expert, in three passes
// over fixed chunks of kChunk assignments (chunk c holds a in [c*kChunk, (c+1)*kChunk)):
//   1. per chunk, a histogram over experts (shared-memory atomics): hist[c, e];
//   2. one block: counts[e] = sum_c hist[c, e], offsets = exclusive scan of counts (and of counts
//      rounded up to the block size: padded_offsets, P), and hist[c, e] becomes the first slot of
//      chunk c's assignments of e: offsets[e] + sum_{c' < c} hist[c', e];
//   3. per chunk, one warp walks its assignments in order, 32 at a time: lanes with the same expert
//      find each other (__match_any_sync), a lane's slot is the chunk's next slot for its expert plus
//      the number of same-expert lanes below it; so within an expert assignments stay in a order
//      (stable) without a global sort.
//   4. once P is known on the host: each expert's segment copied into padded_idx, padded with -1,
//      and block_expert filled.
// Atomics only count (pass 1); every position is computed, so the result is deterministic.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "moe.h"

namespace reasonrl {
namespace {

constexpr int kChunk = 2048;  // assignments per chunk of the counting sort
constexpr int kRouterWarps = 4;
constexpr double kLnFltMax = 88.72283905206835;  // expf(x) is inf above this

__device__ __forceinline__ float load_f(const void* p, DType dt, int64_t i) {
  if (dt == DType::f32) return static_cast<const float*>(p)[i];
  const unsigned short v = static_cast<const unsigned short*>(p)[i];
  if (dt == DType::bf16) return __uint_as_float(static_cast<uint32_t>(v) << 16);
  return __half2float(__ushort_as_half(v));
}

__device__ __forceinline__ bool better(double v, int i, double bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// ---- router -------------------------------------------------------------------------------------------
// Scores and selection values in double: the build's --use_fast_math makes float expf approximate and
// flushes subnormal floats to zero, which reordered experts the CPU kernel and the reference keep apart
// (softmax of [0, -100, -90], K = 2: both tiny scores became 0 and tied). In double neither happens;
// the warp's sum order still differs from the CPU's, so ids agree up to near-ties.
__global__ void moe_router_kernel(int64_t* __restrict__ ids, const void* __restrict__ logits, DType dt,
                                  const float* __restrict__ bias, int64_t T, int E, int K, bool sigmoid) {
  extern __shared__ unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double* sel = reinterpret_cast<double*>(smem) + static_cast<int64_t>(warp) * E;  // (E,) per warp
  unsigned char* taken = smem + sizeof(double) * kRouterWarps * E + warp * E;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
  if (t >= T) return;  // whole warps leave together
  const int64_t row = t * E;
  float m = -INFINITY;
  if (!sigmoid) {
    for (int e = lane; e < E; e += 32) m = fmaxf(m, load_f(logits, dt, row + e));
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  }
  const bool dead = !sigmoid && m == -INFINITY;  // only -inf: scores 0, as the reference's dead row
  double sum = 0.0;
  for (int e = lane; e < E; e += 32) {
    const double z = static_cast<double>(load_f(logits, dt, row + e));
    // sigmoid as float32 computes it (the reference, the CPU kernel): exp(-z) overflows to inf below
    // z = -ln(FLT_MAX) and the score is 0, not the subnormal that double gives (those ranked apart)
    // and above 0.5 rounded to float, as float32 rounds it: from z ~ 16.6 up every score is 1.0f and
    // the experts tie (ids by index there), where double would rank them apart
    double s = sigmoid ? (-z > kLnFltMax ? 0.0 : 1.0 / (1.0 + exp(-z)))
                       : dead ? 0.0 : exp(z - static_cast<double>(m));
    if (sigmoid && s > 0.5) s = static_cast<double>(__double2float_rn(s));  // a normal float: no flush
    sel[e] = s;
    sum += s;
    taken[e] = 0;
  }
  if (!sigmoid) {
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  }
  const double inv = sigmoid || dead ? 1.0 : 1.0 / sum;
  for (int e = lane; e < E; e += 32) {
    const double v = sel[e] * inv + (bias ? static_cast<double>(bias[e]) : 0.0);
    sel[e] = v != v ? -INFINITY : v;  // a NaN score ranks last
  }
  __syncwarp();
  for (int k = 0; k < K; ++k) {
    double bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int e = lane; e < E; e += 32) {
      if (!taken[e] && better(sel[e], e, bv, bi)) {
        bv = sel[e];
        bi = e;
      }
    }
    for (int o = 16; o; o >>= 1) {
      const double ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) {
      ids[t * K + k] = bi;
      taken[bi] = 1;
    }
    __syncwarp();
  }
}

// ---- dispatch -----------------------------------------------------------------------------------------
template <typename I>
__global__ void moe_hist_kernel(int32_t* __restrict__ hist, int32_t* __restrict__ info, const I* __restrict__ ids,
                                int64_t N, int E) {
  extern __shared__ int32_t h[];  // (E,)
  for (int e = threadIdx.x; e < E; e += blockDim.x) h[e] = 0;
  __syncthreads();
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t a1 = a0 + kChunk < N ? a0 + kChunk : N;
  for (int64_t a = a0 + threadIdx.x; a < a1; a += blockDim.x) {
    const int64_t e = static_cast<int64_t>(ids[a]);
    if (e < 0 || e >= E) {
      info[0] = 1;  // reported by the host as a ValueError naming topk_ids
    } else {
      atomicAdd(&h[e], 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[static_cast<int64_t>(blockIdx.x) * E + e] = h[e];
}

// One block. Thread j owns experts j, j + blockDim, ...; the scan over experts is a serial pass by
// thread 0 over E partial sums (E is at most a few thousand).
__global__ void moe_scan_kernel(int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                int32_t* __restrict__ padded_offsets, int32_t* __restrict__ info,
                                int32_t* __restrict__ hist, int64_t C, int E, int64_t block_size) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t s = 0;
    for (int64_t c = 0; c < C; ++c) s += hist[c * E + e];
    counts[e] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t o = 0, p = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = o;
      if (padded_offsets) padded_offsets[e] = p;
      o += counts[e];
      p += static_cast<int32_t>((counts[e] + block_size - 1) / (block_size > 0 ? block_size : 1) * block_size);
    }
    offsets[E] = o;
    if (padded_offsets) padded_offsets[E] = p;
    info[1] = padded_offsets ? p : o;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t base = offsets[e];
    for (int64_t c = 0; c < C; ++c) {
      const int32_t n = hist[c * E + e];
      hist[c * E + e] = base;
      base += n;
    }
  }
}

// One warp per chunk.
template <typename I>
__global__ void moe_scatter_kernel(int32_t* __restrict__ sorted_idx, const int32_t* __restrict__ hist,
                                   const I* __restrict__ ids, int64_t N, int E) {
  extern __shared__ int32_t next[];  // (E,) next slot of each expert for this chunk
  const int lane = threadIdx.x;
  for (int e = lane; e < E; e += 32) next[e] = hist[static_cast<int64_t>(blockIdx.x) * E + e];
  __syncwarp();
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t a1 = a0 + kChunk < N ? a0 + kChunk : N;
  for (int64_t base = a0; base < a1; base += 32) {
    const int64_t a = base + lane;
    const unsigned active = __ballot_sync(0xffffffffu, a < a1);
    int e = -1;
    if (a < a1) {
      const int64_t v = static_cast<int64_t>(ids[a]);
      e = (v < 0 || v >= E) ? -1 : static_cast<int>(v);
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e) & active;
    const int rank = __popc(peers & ((1u << lane) - 1u));
    int32_t slot = 0;
    if (a < a1 && e >= 0) slot = next[e] + rank;
    __syncwarp();
    if (a < a1 && e >= 0) {
      sorted_idx[slot] = static_cast<int32_t>(a);
      if (rank == __popc(peers) - 1) next[e] = slot + 1;  // the group's last lane moves the cursor
    }
    __syncwarp();
  }
}

__global__ void moe_pad_kernel(int32_t* __restrict__ padded_idx, int32_t* __restrict__ block_expert,
                               const int32_t* __restrict__ sorted_idx, const int32_t* __restrict__ offsets,
                               const int32_t* __restrict__ padded_offsets, int64_t block_size) {
  const int e = blockIdx.x;
  const int32_t s0 = offsets[e], n = offsets[e + 1] - s0;
  const int32_t p0 = padded_offsets[e], p1 = padded_offsets[e + 1];
  for (int32_t i = threadIdx.x; i < p1 - p0; i += blockDim.x) padded_idx[p0 + i] = i < n ? sorted_idx[s0 + i] : -1;
  for (int64_t b = p0 / block_size + threadIdx.x; b < p1 / block_size; b += blockDim.x) block_expert[b] = e;
}

int64_t num_chunks(int64_t N) { return (N + kChunk - 1) / kChunk; }

}  // namespace

cudaError_t moe_router_cuda(int64_t* ids, const void* logits, DType dtype, const float* bias, int64_t T, int64_t E,
                            int64_t K, bool sigmoid, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(kRouterWarps) * E * (sizeof(double) + 1);  // 72 KiB at E = 2048
  if (smem > 96 * 1024) return cudaErrorInvalidValue;  // the glue caps E first, with a message
  if (smem > 48 * 1024) {  // past the default: opt in (sm_80: up to 163 KiB, sm_90: 227 KiB)
    const cudaError_t err = cudaFuncSetAttribute(moe_router_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // returned to the glue, which names it; not left for a later check to find
      return err;
    }
  }
  const unsigned grid = static_cast<unsigned>((T + kRouterWarps - 1) / kRouterWarps);
  moe_router_kernel<<<grid, 32 * kRouterWarps, smem, stream>>>(ids, logits, dtype, bias, T, static_cast<int>(E),
                                                                static_cast<int>(K), sigmoid);
  return cudaGetLastError();
}

size_t moe_dispatch_cuda_workspace(int64_t N, int64_t E) {
  const int64_t C = num_chunks(N);
  return static_cast<size_t>((C > 0 ? C : 1) * E) * sizeof(int32_t);
}

cudaError_t moe_dispatch_cuda(int32_t* counts, int32_t* offsets, int32_t* sorted_idx, int32_t* padded_offsets,
                              int32_t* info, const void* ids, bool ids_int64, int64_t N, int64_t E,
                              int64_t block_size, void* ws, cudaStream_t stream) {
  const int64_t C = num_chunks(N);
  int32_t* hist = static_cast<int32_t*>(ws);
  const size_t smem = static_cast<size_t>(E) * sizeof(int32_t);
  const int e = static_cast<int>(E);
  if (C > 0) {
    if (ids_int64) {
      moe_hist_kernel<int64_t><<<static_cast<unsigned>(C), 256, smem, stream>>>(
          hist, info, static_cast<const int64_t*>(ids), N, e);
    } else {
      moe_hist_kernel<int32_t><<<static_cast<unsigned>(C), 256, smem, stream>>>(
          hist, info, static_cast<const int32_t*>(ids), N, e);
    }
  }
  moe_scan_kernel<<<1, 256, 0, stream>>>(counts, offsets, block_size > 0 ? padded_offsets : nullptr, info, hist, C,
                                         e, block_size);
  if (C > 0) {
    if (ids_int64) {
      moe_scatter_kernel<int64_t><<<static_cast<unsigned>(C), 32, smem, stream>>>(
          sorted_idx, hist, static_cast<const int64_t*>(ids), N, e);
    } else {
      moe_scatter_kernel<int32_t><<<static_cast<unsigned>(C), 32, smem, stream>>>(
          sorted_idx, hist, static_cast<const int32_t*>(ids), N, e);
    }
  }
  return cudaGetLastError();
}

cudaError_t moe_pad_cuda(int32_t* padded_idx, int32_t* block_expert, const int32_t* sorted_idx,
                         const int32_t* offsets, const int32_t* padded_offsets, int64_t N, int64_t E, int64_t P,
                         int64_t block_size, cudaStream_t stream) {
  (void)N;
  if (P == 0) return cudaSuccess;
  moe_pad_kernel<<<static_cast<unsigned>(E), 256, 0, stream>>>(padded_idx, block_expert, sorted_idx, offsets,
                                                              padded_offsets, block_size);
  return cudaGetLastError();
}

}  // namespace reasonrl
