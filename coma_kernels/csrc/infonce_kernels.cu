// Fused similarity + InfoNCE tile kernels: the CUDA twin of coma_kernels/infonce_triton.py, driven
// by the same host loop (coma_kernels/tiled.py: partial-statistics merge, row chunks, and the two
// cuBLAS GEMMs that consume G).
//
// Only the CUDA runtime and cuda_fp16.h / cuda_bf16.h are used (no torch headers), so this
// file compiles with a bare `nvcc -c -arch=sm_90a` and is bound to torch by
// infonce_binding.cpp, which passes the current stream in explicitly.
//
// The algorithm (what each kernel computes, the chunked host loop, G's normalisation) is described
// once, in coma_kernels/tiled.py; the maths in coma_kernels/infonce.py.
//
// Tiling: 256 threads as 16×16; each thread owns a 4×4 micro-tile (rows ty+16i, cols tx+16j,
// strided so shared-memory reads are broadcast / conflict-free).  D is consumed in BK slices,
// so any D (8 … 8192+) works.  fp16/bf16 logits tiles use tensor cores (nvcuda::wmma,
// fp32 accumulate, sm_80+ for bf16); fp32 inputs use SIMT FMA (exact fp32, no TF32).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>
#include <stdint.h>

namespace coma_infonce {

constexpr int TX = 16, TY = 16, THREADS = TX * TY;
constexpr int TM = 4, TN = 4;
constexpr int BM = TY * TM;  // 64 rows of A per block
constexpr int BN = TX * TN;  // 64 rows of B per tile
constexpr int BK = 16;       // D slice of the SIMT logits product
constexpr int WK = 32;       // D slice of the tensor-core (WMMA) logits product
constexpr int WLD = WK + 8;  // leading dimension of the 16-bit WMMA staging tiles (multiple of 8)
constexpr int SLD = BN + 4;  // leading dimension of the fp32 logits tile (WMMA stores need a multiple of 4)

// fp16 / bf16 tiles go through tensor cores (nvcuda::wmma, fp32 accumulate); fp32 through SIMT FMA.
template <typename T> struct UseWmma { static constexpr bool value = false; };
template <> struct UseWmma<__half> { static constexpr bool value = true; };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <> struct UseWmma<__nv_bfloat16> { static constexpr bool value = true; };  // bf16 WMMA needs sm_80+
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

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

// 8 warps, each owning a 16-row strip and two 16×16 fragments of the 64×64 tile.
template <typename T>
__device__ __forceinline__ void dot_tile_wmma(const T* __restrict__ A, const T* __restrict__ B, int64_t n_rows,
                                              int64_t n_cols, int64_t D, int64_t lda, int64_t ldb, int64_t r0,
                                              int64_t c0, float (*Ss)[SLD]) {
  using namespace nvcuda;
  __shared__ __align__(32) T As[BM][WLD];
  __shared__ __align__(32) T Bs[BN][WLD];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wr = warp / 2, wc = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  const T zero = from_float<T>(0.f);
  for (int64_t k0 = 0; k0 < D; k0 += WK) {
#pragma unroll
    for (int t = 0; t < (BM * WK) / THREADS; ++t) {
      const int e = tid + t * THREADS, row = e / WK, kk = e % WK;
      const int64_t gk = k0 + kk, ga = r0 + row, gb = c0 + row;
      As[row][kk] = (ga < n_rows && gk < D) ? A[ga * lda + gk] : zero;
      Bs[row][kk] = (gb < n_cols && gk < D) ? B[gb * ldb + gk] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < WK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, &As[wr * 16][kk], WLD);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        // Bs[c][k] read column-major is the [k, c] operand, i.e. Bᵀ
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, &Bs[(wc + f) * 16][kk], WLD);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 2; ++f) wmma::store_matrix_sync(&Ss[wr * 16][(wc + f) * 16], acc[f], SLD, wmma::mem_row_major);
}

// Ss[r][c] = Σ_d A[r0+r, d] · B[c0+c, d] (raw dot products, fp32; 0 outside the matrices).
template <typename T>
__device__ __forceinline__ void logits_tile(const T* __restrict__ A, const T* __restrict__ B, int64_t n_rows,
                                            int64_t n_cols, int64_t D, int64_t lda, int64_t ldb, int64_t r0,
                                            int64_t c0, float (*Ss)[SLD]) {
  if constexpr (UseWmma<T>::value) {
    dot_tile_wmma(A, B, n_rows, n_cols, D, lda, ldb, r0, c0, Ss);
  } else {
    __shared__ float As[BK][BM + 1];
    __shared__ float Bs[BK][BN + 1];
    float acc[TM][TN];
    dot_tile(A, B, n_rows, n_cols, D, lda, ldb, r0, c0, acc, As, Bs);
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Ss[ty + TY * i][tx + TX * j] = acc[i][j];
  }
  __syncthreads();
}

// Merge two online-softmax states (m, l); an empty state has m = -inf, l = 0.
__device__ __forceinline__ void lse_merge(float& m, float& l, float mo, float lo) {
  const float mn = fmaxf(m, mo);
  if (mn == -INFINITY) return;  // both empty: avoid (-inf) - (-inf) = NaN
  l = l * __expf(m - mn) + lo * __expf(mo - mn);
  m = mn;
}

// One thread block: BM rows of Q, the key columns [c_start, c_end) of its split.
template <typename T>
__global__ void __launch_bounds__(THREADS)
    stats_kernel(const T* __restrict__ Q, const T* __restrict__ K, float* __restrict__ rmax, float* __restrict__ rsum,
                 float* __restrict__ pmax, float* __restrict__ psum, int col, int64_t n, int64_t m, int64_t D,
                 int64_t ldq, int64_t ldk, int64_t cols_per_split, float scale) {
  __shared__ __align__(32) float Ss[BM][SLD];  // the logits tile, scanned by rows and by columns
  const int tid = threadIdx.x;
  const int64_t r0 = (int64_t)blockIdx.x * BM;
  const int64_t c_start = (int64_t)blockIdx.y * cols_per_split;
  const int64_t c_end = c_start + cols_per_split < m ? c_start + cols_per_split : m;
  float m_run = -INFINITY, l_run = 0.f;  // threads tid < BM: the state of row r0 + tid

  for (int64_t c0 = c_start; c0 < c_end; c0 += BN) {
    logits_tile(Q, K, n, c_end, D, ldq, ldk, r0, c0, Ss);  // columns >= c_end read as 0
    const int n_valid_c = (int)(c_end - c0 < BN ? c_end - c0 : BN);
    const int n_valid_r = (int)(n - r0 < BM ? n - r0 : BM);
    if (tid < BM) {  // one thread per row: tile max, then sum-exp, then merge (online LSE)
      if (tid < n_valid_r) {
        float mt = -INFINITY;
        for (int c = 0; c < n_valid_c; ++c) mt = fmaxf(mt, Ss[tid][c] * scale);
        float lt = 0.f;
        for (int c = 0; c < n_valid_c; ++c) lt += __expf(Ss[tid][c] * scale - mt);
        lse_merge(m_run, l_run, mt, lt);
      }
    } else if (col && tid < BM + BN) {  // one thread per column: this block's partial column LSE
      const int c = tid - BM;
      if (c < n_valid_c) {
        float mt = -INFINITY;
        for (int r = 0; r < n_valid_r; ++r) mt = fmaxf(mt, Ss[r][c] * scale);
        float lt = 0.f;
        for (int r = 0; r < n_valid_r; ++r) lt += __expf(Ss[r][c] * scale - mt);
        pmax[(int64_t)blockIdx.x * m + c0 + c] = mt;
        psum[(int64_t)blockIdx.x * m + c0 + c] = lt;
      }
    }
    __syncthreads();  // Ss is rewritten by the next tile
  }
  if (tid < BM && r0 + tid < n) {
    rmax[(int64_t)blockIdx.y * n + r0 + tid] = m_run;
    rsum[(int64_t)blockIdx.y * n + r0 + tid] = l_run;
  }
}

// One thread block: a BM × BN tile of rows [row0, row1) of Q against keys [c0, c0 + BN).
template <typename T, typename GT>
__global__ void __launch_bounds__(THREADS)
    grad_tile_kernel(const T* __restrict__ Q, const T* __restrict__ K, GT* __restrict__ G, float* __restrict__ dsp,
                     const float* __restrict__ rlse, const float* __restrict__ rcoef, const float* __restrict__ clse,
                     const float* __restrict__ ccoef, const int64_t* __restrict__ pidx,
                     const float* __restrict__ pcoef, int has_col, int has_pos, int64_t row0, int64_t row1, int64_t m,
                     int64_t D, int64_t ldq, int64_t ldk, int64_t ldg, float scale) {
  __shared__ __align__(32) float Ss[BM][SLD];
  __shared__ float red[THREADS / 32];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int64_t r0 = row0 + (int64_t)blockIdx.x * BM;
  const int64_t c0 = (int64_t)blockIdx.y * BN;
  logits_tile(Q, K, row1, m, D, ldq, ldk, r0, c0, Ss);

  float ds_local = 0.f;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = r0 + ty + TY * i;
    if (r >= row1) continue;
    const float rl = rlse[r], rc = rcoef[r];
    const int64_t pi = has_pos ? pidx[r] : -1;
    const float pc = has_pos ? pcoef[r] : 0.f;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = c0 + tx + TX * j;
      if (c >= m) continue;
      const float dot = Ss[ty + TY * i][tx + TX * j];
      const float s = dot * scale;
      float g = rc * __expf(s - rl);
      if (has_col) g += ccoef[c] * __expf(s - clse[c]);
      if (c == pi) g -= pc;  // the positive's −w_i, in fp32 before rounding (the terms nearly cancel)
      ds_local = fmaf(g, dot, ds_local);
      G[(r - row0) * ldg + c] = from_float<GT>(g);
    }
  }
  for (int off = 16; off > 0; off >>= 1) ds_local += __shfl_down_sync(0xffffffffu, ds_local, off);
  if ((tid & 31) == 0) red[tid >> 5] = ds_local;
  __syncthreads();
  if (tid == 0) {
    float total = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) total += red[w];
    dsp[(int64_t)blockIdx.x * gridDim.y + blockIdx.y] = total;  // summed on the host: deterministic
  }
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename GT>
cudaError_t launch_grad(const void* Q, const void* K, void* G, float* dsp, const float* rlse, const float* rcoef,
                        const float* clse, const float* ccoef, const int64_t* pidx, const float* pcoef, int has_col,
                        int has_pos, int64_t row0, int64_t row1, int64_t m, int64_t D, int64_t ldq, int64_t ldk,
                        int64_t ldg, float scale, cudaStream_t stream) {
  const dim3 grid((unsigned)cdiv(row1 - row0, BM), (unsigned)cdiv(m, BN));
  grad_tile_kernel<T, GT><<<grid, THREADS, 0, stream>>>(static_cast<const T*>(Q), static_cast<const T*>(K),
                                                        static_cast<GT*>(G), dsp, rlse, rcoef, clse, ccoef, pidx,
                                                        pcoef, has_col, has_pos, row0, row1, m, D, ldq, ldk, ldg,
                                                        scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_stats(const void* Q, const void* K, float* rmax, float* rsum, float* pmax, float* psum, int col,
                         int64_t n, int64_t m, int64_t D, int64_t ldq, int64_t ldk, int64_t cols_per_split, int splits,
                         float scale, cudaStream_t stream) {
  const dim3 grid((unsigned)cdiv(n, BM), (unsigned)splits);
  stats_kernel<T><<<grid, THREADS, 0, stream>>>(static_cast<const T*>(Q), static_cast<const T*>(K), rmax, rsum, pmax,
                                                psum, col, n, m, D, ldq, ldk, cols_per_split, scale);
  return cudaGetLastError();
}

}  // namespace coma_infonce

using namespace coma_infonce;

// dtype codes shared with infonce_binding.cpp: 0 = float32, 1 = float16, 2 = bfloat16.
extern "C" int coma_infonce_tile() { return BM; }  // BM == BN

extern "C" cudaError_t coma_infonce_stats(int dtype, const void* Q, const void* K, float* rmax, float* rsum,
                                          float* pmax, float* psum, int col, int64_t n, int64_t m, int64_t D,
                                          int64_t ldq, int64_t ldk, int64_t cols_per_split, int splits, float scale,
                                          cudaStream_t stream) {
  if (n <= 0 || m <= 0 || splits <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: return launch_stats<float>(Q, K, rmax, rsum, pmax, psum, col, n, m, D, ldq, ldk, cols_per_split, splits, scale, stream);
    case 1: return launch_stats<__half>(Q, K, rmax, rsum, pmax, psum, col, n, m, D, ldq, ldk, cols_per_split, splits, scale, stream);
    case 2: return launch_stats<__nv_bfloat16>(Q, K, rmax, rsum, pmax, psum, col, n, m, D, ldq, ldk, cols_per_split, splits, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

// G has the input dtype for fp16/bf16 (tensor-core GEMM operand) and float32 for float32.
extern "C" cudaError_t coma_infonce_grad_tiles(int dtype, const void* Q, const void* K, void* G, float* dsp,
                                               const float* rlse, const float* rcoef, const float* clse,
                                               const float* ccoef, const int64_t* pidx, const float* pcoef,
                                               int has_col, int has_pos, int64_t row0, int64_t row1, int64_t m,
                                               int64_t D, int64_t ldq, int64_t ldk, int64_t ldg, float scale,
                                               cudaStream_t stream) {
  if (row1 <= row0 || m <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: return launch_grad<float, float>(Q, K, G, dsp, rlse, rcoef, clse, ccoef, pidx, pcoef, has_col, has_pos, row0, row1, m, D, ldq, ldk, ldg, scale, stream);
    case 1: return launch_grad<__half, __half>(Q, K, G, dsp, rlse, rcoef, clse, ccoef, pidx, pcoef, has_col, has_pos, row0, row1, m, D, ldq, ldk, ldg, scale, stream);
    case 2: return launch_grad<__nv_bfloat16, __nv_bfloat16>(Q, K, G, dsp, rlse, rcoef, clse, ccoef, pidx, pcoef, has_col, has_pos, row0, row1, m, D, ldq, ldk, ldg, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}
