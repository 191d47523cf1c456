// torch binding of infonce_kernels.cu: checks, the device guard and the current CUDA stream.
// Built just-in-time by coma_kernels/infonce_cuda.py (torch.utils.cpp_extension.load + ninja) or
// ahead of time by setup.py with COMA_BUILD_CUDA=1, as the module coma_kernels._infonce_cuda.
// Outputs are allocated by the caller (coma_kernels/tiled.py) and filled in place.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <optional>

extern "C" {
int coma_infonce_tile();
cudaError_t coma_infonce_stats(int dtype, const void* Q, const void* K, float* rmax, float* rsum, float* pmax,
                               float* psum, int col, int64_t n, int64_t m, int64_t D, int64_t ldq, int64_t ldk,
                               int64_t cols_per_split, int splits, float scale, cudaStream_t stream);
cudaError_t coma_infonce_grad_tiles(int dtype, const void* Q, const void* K, void* G, float* dsp, const float* rlse,
                                    const float* rcoef, const float* clse, const float* ccoef, const int64_t* pidx,
                                    const float* pcoef, int has_col, int has_pos, int64_t row0, int64_t row1,
                                    int64_t m, int64_t D, int64_t ldq, int64_t ldk, int64_t ldg, float scale,
                                    cudaStream_t stream);
}

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "infonce cuda: dtype ", t.scalar_type(), " unsupported; use float32/float16/bfloat16");
  }
  return -1;
}

void check_pair(const at::Tensor& Q, const at::Tensor& K) {
  TORCH_CHECK(Q.is_cuda() && K.is_cuda(), "infonce cuda: inputs must be CUDA tensors");
  TORCH_CHECK(Q.dim() == 2 && K.dim() == 2 && Q.size(1) == K.size(1), "infonce cuda: expected Q [n, D], K [m, D]");
  TORCH_CHECK(Q.scalar_type() == K.scalar_type(), "infonce cuda: Q and K must share a dtype");
  TORCH_CHECK(Q.device() == K.device(), "infonce cuda: Q and K must be on the same device");
  TORCH_CHECK(Q.stride(1) == 1 && K.stride(1) == 1, "infonce cuda: rows of Q and K must be contiguous");
}

float* f32(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() >= numel,
              "infonce cuda: ", name, " must be a contiguous float32 CUDA tensor of at least ", numel, " elements");
  return t.data_ptr<float>();
}

void ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "infonce cuda: ", what, " launch failed: ", cudaGetErrorString(err));
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// rmax/rsum [splits, n]: per-row (max, sum-exp) of scale·Q Kᵀ over each split of cols_per_split
// keys; pmax/psum [ceil(n / tile), m]: per row block and column (only when col).
void stats(const at::Tensor& Q, const at::Tensor& K, at::Tensor rmax, at::Tensor rsum, at::Tensor pmax,
           at::Tensor psum, bool col, int64_t cols_per_split, double scale) {
  check_pair(Q, K);
  const int64_t n = Q.size(0), m = K.size(0), splits = rmax.size(0), tile = coma_infonce_tile();
  TORCH_CHECK(rmax.dim() == 2 && rmax.size(1) == n && cols_per_split > 0 && splits * cols_per_split >= m,
              "infonce cuda: rmax must be [splits, n] with splits * cols_per_split >= m");
  const int64_t part = col ? cdiv(n, tile) * m : 0;
  const c10::cuda::CUDAGuard guard(Q.device());
  ok(coma_infonce_stats(dtype_code(Q), Q.data_ptr(), K.data_ptr(), f32(rmax, splits * n, "rmax"),
                        f32(rsum, splits * n, "rsum"), f32(pmax, part, "pmax"), f32(psum, part, "psum"), col, n, m,
                        Q.size(1), Q.stride(0), K.stride(0), cols_per_split, static_cast<int>(splits),
                        static_cast<float>(scale), c10::cuda::getCurrentCUDAStream().stream()),
     "stats");
}

// G [row1 - row0, m] (Q's dtype) <- softmax-gradient weights of rows [row0, row1), the optional
// column (clse, ccoef) and positive (pidx int64, pcoef) terms included; dsp [grid] float32 <-
// per-tile sum of G * (Q Kᵀ).
void grad_tiles(const at::Tensor& Q, const at::Tensor& K, at::Tensor G, at::Tensor dsp, const at::Tensor& rlse,
                const at::Tensor& rcoef, const std::optional<at::Tensor>& clse,
                const std::optional<at::Tensor>& ccoef, const std::optional<at::Tensor>& pidx,
                const std::optional<at::Tensor>& pcoef, int64_t row0, int64_t row1, double scale) {
  check_pair(Q, K);
  const int64_t n = Q.size(0), m = K.size(0), tile = coma_infonce_tile();
  TORCH_CHECK(0 <= row0 && row0 < row1 && row1 <= n, "infonce cuda: bad row range [", row0, ", ", row1, ")");
  TORCH_CHECK(G.is_cuda() && G.dim() == 2 && G.size(0) >= row1 - row0 && G.size(1) == m && G.stride(1) == 1 &&
                  G.scalar_type() == Q.scalar_type(),
              "infonce cuda: G must be a [rows, m] CUDA tensor with contiguous rows and Q's dtype");
  TORCH_CHECK(clse.has_value() == ccoef.has_value(), "infonce cuda: clse and ccoef come together");
  TORCH_CHECK(pidx.has_value() == pcoef.has_value(), "infonce cuda: pidx and pcoef come together");
  const bool has_col = clse.has_value(), has_pos = pidx.has_value();
  if (has_pos)
    TORCH_CHECK(pidx->is_cuda() && pidx->scalar_type() == at::kLong && pidx->is_contiguous() && pidx->numel() >= n,
                "infonce cuda: pidx must be a contiguous int64 CUDA vector of length ", n);
  const c10::cuda::CUDAGuard guard(Q.device());
  ok(coma_infonce_grad_tiles(dtype_code(Q), Q.data_ptr(), K.data_ptr(), G.data_ptr(),
                             f32(dsp, cdiv(row1 - row0, tile) * cdiv(m, tile), "dsp"), f32(rlse, n, "rlse"),
                             f32(rcoef, n, "rcoef"), has_col ? f32(*clse, m, "clse") : nullptr,
                             has_col ? f32(*ccoef, m, "ccoef") : nullptr,
                             has_pos ? pidx->data_ptr<int64_t>() : nullptr, has_pos ? f32(*pcoef, n, "pcoef") : nullptr,
                             has_col, has_pos, row0, row1, m, Q.size(1),
                             Q.stride(0), K.stride(0), G.stride(0), static_cast<float>(scale),
                             c10::cuda::getCurrentCUDAStream().stream()),
     "grad_tiles");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused InfoNCE tile kernels (see coma_kernels/csrc/infonce_kernels.cu and coma_kernels/tiled.py)";
  m.def("tile", &coma_infonce_tile, "rows (= key columns) per thread block");
  m.def("stats", &stats, "per-row and per-column partial log-sum-exp statistics", py::arg("Q"), py::arg("K"),
        py::arg("rmax"), py::arg("rsum"), py::arg("pmax"), py::arg("psum"), py::arg("col"),
        py::arg("cols_per_split"), py::arg("scale"));
  m.def("grad_tiles", &grad_tiles, "softmax-gradient weights G of a row chunk", py::arg("Q"), py::arg("K"),
        py::arg("G"), py::arg("dsp"), py::arg("rlse"), py::arg("rcoef"), py::arg("clse"), py::arg("ccoef"),
        py::arg("pidx"), py::arg("pcoef"), py::arg("row0"), py::arg("row1"), py::arg("scale"));
}
