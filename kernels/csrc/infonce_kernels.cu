// Fused similarity + InfoNCE kernels: the CUDA twin of kernels/infonce_triton.py.
//
// Only the CUDA runtime and cuda_fp16.h / cuda_bf16.h are used (no torch headers), so this
// file compiles with a bare `nvcc -c -arch=sm_90a` and is bound to torch by
// infonce_binding.cpp, which passes the current stream in explicitly.
//
// Maths (kernels/infonce.py):  S = s · A Bᵀ, A [r, D], B [c, D].
//   row_lse kernel:  lse_i = log Σ_j exp S_ij, one thread block per BM rows of A, streaming B
//                    in BN-row tiles with an online (max, sum-exp) per row.
//   grad kernel:     G_ij = a_i exp(S_ij − lse_i) + b_j exp(S_ij − lse'_j)  (either term optional)
//                    dA  += out_scale · G B   (fp32 buffer owned by the block: no atomics)
//                    ds_part[block] = Σ_ij G_ij (a_i·b_j)   (for d logit_scale)
// Every launch recomputes its logits tiles; nothing of size r×c is stored.  All products
// accumulate in fp32 whatever the input dtype.
//
// Tiling: 256 threads as 16×16; each thread owns a 4×4 micro-tile (rows ty+16i, cols tx+16j,
// strided so shared-memory reads are broadcast / conflict-free).  D is consumed in BK slices
// for the logits and in BD slices for the gradient update, so any D (8 … 8192+) works.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace coma_infonce {

constexpr int TX = 16, TY = 16, THREADS = TX * TY;
constexpr int TM = 4, TN = 4;
constexpr int BM = TY * TM;  // 64 rows of A per block
constexpr int BN = TX * TN;  // 64 rows of B per tile
constexpr int BK = 16;       // D slice of the logits product
constexpr int BD = 64;       // D slice of the gradient update

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// acc[i][j] = Σ_d A[r0+ty+TY·i, d] · B[c0+tx+TX·j, d]  (zero outside the matrices)
template <typename T>
__device__ __forceinline__ void dot_tile(const T* __restrict__ A, const T* __restrict__ B, int64_t n_rows,
                                         int64_t n_cols, int64_t D, int64_t lda, int64_t ldb, int64_t r0,
                                         int64_t c0, float (&acc)[TM][TN], float (*As)[BM + 1],
                                         float (*Bs)[BN + 1]) {
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    // +1 padding: the transposed stores (kk fastest across threads) hit distinct banks
#pragma unroll
    for (int t = 0; t < (BM * BK) / THREADS; ++t) {
      const int e = tid + t * THREADS, row = e / BK, kk = e % BK;
      const int64_t gk = k0 + kk, ga = r0 + row, gb = c0 + row;
      As[kk][row] = (ga < n_rows && gk < D) ? to_float(A[ga * lda + gk]) : 0.f;
      Bs[kk][row] = (gb < n_cols && gk < D) ? to_float(B[gb * ldb + gk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + TY * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + TX * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// Merge two online-softmax states (m, l); an empty state has m = -inf, l = 0.
__device__ __forceinline__ void lse_merge(float& m, float& l, float mo, float lo) {
  const float mn = fmaxf(m, mo);
  if (mn == -INFINITY) return;  // both empty: avoid (-inf) - (-inf) = NaN
  l = l * __expf(m - mn) + lo * __expf(mo - mn);
  m = mn;
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    row_lse_kernel(const T* __restrict__ A, const T* __restrict__ B, float* __restrict__ lse, int64_t n_rows,
                   int64_t n_cols, int64_t D, int64_t lda, int64_t ldb, float scale) {
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int64_t r0 = (int64_t)blockIdx.x * BM;
  float m[TM], l[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) m[i] = -INFINITY, l[i] = 0.f;

  for (int64_t c0 = 0; c0 < n_cols; c0 += BN) {
    float acc[TM][TN];
    dot_tile(A, B, n_rows, n_cols, D, lda, ldb, r0, c0, acc, As, Bs);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j)
        if (c0 + tx + TX * j < n_cols) lse_merge(m[i], l[i], acc[i][j] * scale, 1.f);
  }
  // the TX threads sharing a row are 16 consecutive lanes of one warp
#pragma unroll
  for (int i = 0; i < TM; ++i)
    for (int off = TX / 2; off > 0; off >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[i], off, TX);
      const float lo = __shfl_xor_sync(0xffffffffu, l[i], off, TX);
      lse_merge(m[i], l[i], mo, lo);
    }
  if (tx == 0)
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t r = r0 + ty + TY * i;
      if (r < n_rows) lse[r] = m[i] + __logf(l[i]);
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    grad_kernel(const T* __restrict__ A, const T* __restrict__ B, float* __restrict__ dA, float* __restrict__ ds_part,
                const float* __restrict__ rlse, const float* __restrict__ rcoef, const float* __restrict__ clse,
                const float* __restrict__ ccoef, int has_row, int has_col, int want_ds, int64_t n_rows,
                int64_t n_cols, int64_t D, int64_t lda, int64_t ldb, int64_t ldda, float scale, float out_scale) {
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  __shared__ float Gs[BM][BN + 1];  // softmax weights of the current tile
  __shared__ float Bt[BN][BD + 1];  // a D slice of the current B tile
  __shared__ float red[THREADS / 32];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int64_t r0 = (int64_t)blockIdx.x * BM;

  float rl[TM], rc[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = r0 + ty + TY * i;
    const bool ok = has_row && r < n_rows;
    rl[i] = ok ? rlse[r] : 0.f;
    rc[i] = ok ? rcoef[r] : 0.f;
  }
  float ds_local = 0.f;

  for (int64_t c0 = 0; c0 < n_cols; c0 += BN) {
    float acc[TM][TN];
    dot_tile(A, B, n_rows, n_cols, D, lda, ldb, r0, c0, acc, As, Bs);
    float cl[TN], cc[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = c0 + tx + TX * j;
      const bool ok = has_col && c < n_cols;
      cl[j] = ok ? clse[c] : 0.f;
      cc[j] = ok ? ccoef[c] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        float g = 0.f;
        if (r0 + ty + TY * i < n_rows && c0 + tx + TX * j < n_cols) {
          const float s = acc[i][j] * scale;
          if (has_row) g += rc[i] * __expf(s - rl[i]);
          if (has_col) g += cc[j] * __expf(s - cl[j]);
          ds_local = fmaf(g, acc[i][j], ds_local);
        }
        Gs[ty + TY * i][tx + TX * j] = g;
      }
    __syncthreads();

    for (int64_t d0 = 0; d0 < D; d0 += BD) {
#pragma unroll
      for (int t = 0; t < (BN * BD) / THREADS; ++t) {
        const int e = tid + t * THREADS, c = e / BD, d = e % BD;
        const int64_t gc = c0 + c, gd = d0 + d;
        Bt[c][d] = (gc < n_cols && gd < D) ? to_float(B[gc * ldb + gd]) : 0.f;
      }
      __syncthreads();
      float out[TM][TN];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) out[i][j] = 0.f;
      for (int c = 0; c < BN; ++c) {
        float gv[TM], bv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) gv[i] = Gs[ty + TY * i][c];
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = Bt[c][tx + TX * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) out[i][j] = fmaf(gv[i], bv[j], out[i][j]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t r = r0 + ty + TY * i;
        if (r >= n_rows) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int64_t d = d0 + tx + TX * j;
          if (d < D) dA[r * ldda + d] += out_scale * out[i][j];  // rows owned by this block only
        }
      }
      __syncthreads();  // Bt (and, after the last slice, Gs) is rewritten next
    }
  }

  if (want_ds) {
    for (int off = 16; off > 0; off >>= 1) ds_local += __shfl_down_sync(0xffffffffu, ds_local, off);
    if ((tid & 31) == 0) red[tid >> 5] = ds_local;
    __syncthreads();
    if (tid == 0) {
      float total = 0.f;
      for (int w = 0; w < THREADS / 32; ++w) total += red[w];
      ds_part[blockIdx.x] = total;  // one partial per block, summed on the host: deterministic
    }
  }
}

inline dim3 grid_for(int64_t n_rows) { return dim3((unsigned)((n_rows + BM - 1) / BM)); }

}  // namespace coma_infonce

using namespace coma_infonce;

// dtype codes shared with infonce_binding.cpp: 0 = float32, 1 = float16, 2 = bfloat16.
extern "C" int coma_infonce_rows_per_block() { return BM; }

extern "C" cudaError_t coma_infonce_row_lse(int dtype, const void* A, const void* B, float* lse, int64_t n_rows,
                                            int64_t n_cols, int64_t D, int64_t lda, int64_t ldb, float scale,
                                            cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  const dim3 grid = grid_for(n_rows);
  switch (dtype) {
    case 0:
      row_lse_kernel<float><<<grid, THREADS, 0, stream>>>(static_cast<const float*>(A), static_cast<const float*>(B),
                                                          lse, n_rows, n_cols, D, lda, ldb, scale);
      break;
    case 1:
      row_lse_kernel<__half><<<grid, THREADS, 0, stream>>>(static_cast<const __half*>(A),
                                                           static_cast<const __half*>(B), lse, n_rows, n_cols, D,
                                                           lda, ldb, scale);
      break;
    case 2:
      row_lse_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(static_cast<const __nv_bfloat16*>(A),
                                                                  static_cast<const __nv_bfloat16*>(B), lse, n_rows,
                                                                  n_cols, D, lda, ldb, scale);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t coma_infonce_grad_rows(int dtype, const void* A, const void* B, float* dA, float* ds_part,
                                              const float* rlse, const float* rcoef, const float* clse,
                                              const float* ccoef, int has_row, int has_col, int want_ds,
                                              int64_t n_rows, int64_t n_cols, int64_t D, int64_t lda, int64_t ldb,
                                              int64_t ldda, float scale, float out_scale, cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  const dim3 grid = grid_for(n_rows);
  switch (dtype) {
    case 0:
      grad_kernel<float><<<grid, THREADS, 0, stream>>>(static_cast<const float*>(A), static_cast<const float*>(B), dA,
                                                       ds_part, rlse, rcoef, clse, ccoef, has_row, has_col, want_ds,
                                                       n_rows, n_cols, D, lda, ldb, ldda, scale, out_scale);
      break;
    case 1:
      grad_kernel<__half><<<grid, THREADS, 0, stream>>>(static_cast<const __half*>(A), static_cast<const __half*>(B),
                                                        dA, ds_part, rlse, rcoef, clse, ccoef, has_row, has_col,
                                                        want_ds, n_rows, n_cols, D, lda, ldb, ldda, scale, out_scale);
      break;
    case 2:
      grad_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(A), static_cast<const __nv_bfloat16*>(B), dA, ds_part, rlse, rcoef, clse,
          ccoef, has_row, has_col, want_ds, n_rows, n_cols, D, lda, ldb, ldda, scale, out_scale);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
