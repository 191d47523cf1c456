// Fused epilogues of the CUDA InfoNCE backend.  The logits of a chunk of query rows,
// S = Q_c Kᵀ (raw dot products, fp32 [C, m], row-major), come from a cuBLAS GEMM with bf16/fp16
// operands and an fp32 result (torch.mm(..., out_dtype=float32) in coma_kernels/infonce_cuda.py);
// these kernels read S once per use and produce what the loss needs from it:
//
//   coma_infonce_row_lse      lse[r]  = log Σ_c exp(scale·S[r, c])                  (one block per row)
//   coma_infonce_col_partials pmax/psum[group, c] = (max, Σ exp(· − max)) of scale·S[r, c] over a
//                             group of ROWS rows (merged over groups on the host, in fp32)
//   coma_infonce_grad_weights G[r, c] = a_r·exp(scale·S − rlse_r) + b_c·exp(scale·S − clse_c) − w_r·[c = p_r]
//                             in G's dtype (the GEMM operand of dQ = s·G K and dK = s·Gᵀ Q; d logit_scale
//                             = Σ Q ⊙ (G K) is read off the dQ product on the host)
//
// Each thread owns 4 consecutive columns (one float4 load when the row is 16-byte aligned), so a
// warp reads 512 contiguous bytes per row; the epilogues are bound by memory bandwidth, which is
// the point of leaving the O(n·m·D) work to cuBLAS.  The positive's −w_r is subtracted in fp32
// before G is rounded (in the trained regime the two terms nearly cancel).
//
// Only the CUDA runtime and cuda_fp16.h / cuda_bf16.h are used (no torch headers), so this file
// compiles with a bare `nvcc -c -arch=sm_90a` (tests/test_kernels_cuda.py) and is bound to torch
// by infonce_binding.cpp, which passes the current stream in.  The maths: coma_kernels/infonce.py.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace coma_infonce {

constexpr int THREADS = 256;
constexpr int VEC = 4;                      // columns per thread
constexpr int COLS = THREADS * VEC;         // columns per block of the column and gradient kernels
constexpr int ROWS = 128;                   // rows per column-statistics group

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Four G elements stored at once (8 bytes for fp16/bf16, 16 for fp32).
template <typename T> struct alignas(VEC * sizeof(T)) Pack { T v[VEC]; };

// Online softmax state (max, sum of exp(x − max)); empty: (-inf, 0).
struct Lse {
  float m, l;
  __device__ __forceinline__ Lse() : m(-INFINITY), l(0.f) {}
  __device__ __forceinline__ void add(float x) {  // one exp per element
    if (x > m) {
      l = l * __expf(m - x) + 1.f;
      m = x;
    } else {
      l += __expf(x - m);
    }
  }
  __device__ __forceinline__ void merge(float mo, float lo) {
    const float mn = fmaxf(m, mo);
    if (mn == -INFINITY) return;  // both empty: no (-inf) − (-inf)
    l = l * __expf(m - mn) + lo * __expf(mo - mn);
    m = mn;
  }
};

// 4 columns [c, c + 4) of a row (zeros past `cols`); a float4 load when aligned and whole.
__device__ __forceinline__ void load4(const float* __restrict__ row, int64_t c, int64_t cols, bool vec,
                                      float (&x)[VEC]) {
  if (vec && c + VEC <= cols) {
    const float4 v = *reinterpret_cast<const float4*>(row + c);
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = c + j < cols ? row[c + j] : 0.f;
  }
}

// grid: one block per row of S.
__global__ void __launch_bounds__(THREADS)
    row_lse_kernel(const float* __restrict__ S, int64_t m, int64_t lds, float scale, float* __restrict__ lse) {
  __shared__ float red_m[THREADS / 32], red_l[THREADS / 32];
  const float* row = S + (int64_t)blockIdx.x * lds;
  const bool vec = (lds % VEC == 0) && ((reinterpret_cast<uintptr_t>(S) & 15) == 0);
  Lse st;
  for (int64_t c = (int64_t)threadIdx.x * VEC; c < m; c += COLS) {
    float x[VEC];
    load4(row, c, m, vec, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (c + j < m) st.add(x[j] * scale);
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float mo = __shfl_down_sync(0xffffffffu, st.m, off), lo = __shfl_down_sync(0xffffffffu, st.l, off);
    st.merge(mo, lo);
  }
  if ((threadIdx.x & 31) == 0) {
    red_m[threadIdx.x >> 5] = st.m;
    red_l[threadIdx.x >> 5] = st.l;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Lse total;
    for (int w = 0; w < THREADS / 32; ++w) total.merge(red_m[w], red_l[w]);
    lse[blockIdx.x] = total.m + logf(total.l);
  }
}

// grid: (column blocks of COLS, row groups of ROWS); writes group `group0 + blockIdx.y`.
__global__ void __launch_bounds__(THREADS)
    col_partials_kernel(const float* __restrict__ S, int64_t rows, int64_t m, int64_t lds, float scale,
                        float* __restrict__ pmax, float* __restrict__ psum, int64_t group0) {
  const int64_t c = (int64_t)blockIdx.x * COLS + (int64_t)threadIdx.x * VEC;
  if (c >= m) return;
  const bool vec = (lds % VEC == 0) && ((reinterpret_cast<uintptr_t>(S) & 15) == 0);
  const int64_t r_end = ((int64_t)blockIdx.y + 1) * ROWS < rows ? ((int64_t)blockIdx.y + 1) * ROWS : rows;
  Lse st[VEC];
  for (int64_t r = (int64_t)blockIdx.y * ROWS; r < r_end; ++r) {
    float x[VEC];
    load4(S + r * lds, c, m, vec, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) st[j].add(x[j] * scale);
  }
  const int64_t out = (group0 + blockIdx.y) * m;
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    if (c + j < m) {
      pmax[out + c + j] = st[j].m;
      psum[out + c + j] = st[j].l;
    }
}

// grid: (rows of the chunk, column blocks of COLS).  Row vectors (rlse, rcoef, pidx, pcoef) are
// the chunk's slices; pidx holds global key indices (−1: none).
template <typename GT>
__global__ void __launch_bounds__(THREADS)
    grad_weights_kernel(const float* __restrict__ S, int64_t m, int64_t lds, float scale, GT* __restrict__ G,
                        int64_t ldg, const float* __restrict__ rlse,
                        const float* __restrict__ rcoef, const float* __restrict__ clse,
                        const float* __restrict__ ccoef, const int64_t* __restrict__ pidx,
                        const float* __restrict__ pcoef) {
  const int64_t r = blockIdx.x;
  const int64_t c = (int64_t)blockIdx.y * COLS + (int64_t)threadIdx.x * VEC;
  const bool vec = (lds % VEC == 0) && ((reinterpret_cast<uintptr_t>(S) & 15) == 0);
  const bool gvec = (ldg % VEC == 0) && ((reinterpret_cast<uintptr_t>(G) % sizeof(Pack<GT>)) == 0);
  if (c >= m) return;
  const float rl = rlse[r], rc = rcoef[r];
  const int64_t p = pidx ? pidx[r] : -1;
  const float pc = pidx ? pcoef[r] : 0.f;
  float x[VEC];
  load4(S + r * lds, c, m, vec, x);
  Pack<GT> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float s = x[j] * scale;
    float g = rc * __expf(s - rl);
    if (clse && c + j < m) g += ccoef[c + j] * __expf(s - clse[c + j]);
    if (c + j == p) g -= pc;
    pk.v[j] = from_float<GT>(g);
  }
  GT* out = G + r * ldg + c;
  if (gvec && c + VEC <= m) {
    *reinterpret_cast<Pack<GT>*>(out) = pk;
  } else {
    for (int j = 0; j < VEC && c + j < m; ++j) out[j] = pk.v[j];
  }
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace coma_infonce

using namespace coma_infonce;

extern "C" int coma_infonce_rows_per_group() { return ROWS; }

extern "C" cudaError_t coma_infonce_row_lse(const float* S, int64_t rows, int64_t m, int64_t lds, float scale,
                                            float* lse, cudaStream_t stream) {
  if (rows <= 0 || m <= 0) return cudaSuccess;
  row_lse_kernel<<<(unsigned)rows, THREADS, 0, stream>>>(S, m, lds, scale, lse);
  return cudaGetLastError();
}

extern "C" cudaError_t coma_infonce_col_partials(const float* S, int64_t rows, int64_t m, int64_t lds, float scale,
                                                 float* pmax, float* psum, int64_t group0, cudaStream_t stream) {
  if (rows <= 0 || m <= 0) return cudaSuccess;
  const dim3 grid((unsigned)cdiv(m, COLS), (unsigned)cdiv(rows, ROWS));
  col_partials_kernel<<<grid, THREADS, 0, stream>>>(S, rows, m, lds, scale, pmax, psum, group0);
  return cudaGetLastError();
}

// dtype codes shared with infonce_binding.cpp (G's dtype): 0 = float32, 1 = float16, 2 = bfloat16.
extern "C" cudaError_t coma_infonce_grad_weights(int dtype, const float* S, int64_t rows, int64_t m, int64_t lds,
                                                 float scale, void* G, int64_t ldg, const float* rlse,
                                                 const float* rcoef, const float* clse, const float* ccoef,
                                                 const int64_t* pidx, const float* pcoef, cudaStream_t stream) {
  if (rows <= 0 || m <= 0) return cudaSuccess;
  const dim3 grid((unsigned)rows, (unsigned)cdiv(m, COLS));
  switch (dtype) {
    case 0:
      grad_weights_kernel<float><<<grid, THREADS, 0, stream>>>(S, m, lds, scale, static_cast<float*>(G), ldg,
                                                               rlse, rcoef, clse, ccoef, pidx, pcoef);
      break;
    case 1:
      grad_weights_kernel<__half><<<grid, THREADS, 0, stream>>>(S, m, lds, scale, static_cast<__half*>(G), ldg,
                                                                rlse, rcoef, clse, ccoef, pidx, pcoef);
      break;
    case 2:
      grad_weights_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
          S, m, lds, scale, static_cast<__nv_bfloat16*>(G), ldg, rlse, rcoef, clse, ccoef, pidx, pcoef);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
