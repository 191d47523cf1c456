// torch binding of infonce_kernels.cu: checks, the device guard and the current CUDA stream.
// Built just-in-time by coma_kernels/infonce_cuda.py (torch.utils.cpp_extension.load + ninja) or
// ahead of time by setup.py with COMA_BUILD_CUDA=1, as the module coma_kernels._infonce_cuda.
// Outputs are allocated by the caller (coma_kernels/infonce_cuda.py) and filled in place.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <optional>

extern "C" {
int coma_infonce_rows_per_group();
cudaError_t coma_infonce_row_lse(const float* S, int64_t rows, int64_t m, int64_t lds, float scale, float* lse,
                                 cudaStream_t stream);
cudaError_t coma_infonce_col_partials(const float* S, int64_t rows, int64_t m, int64_t lds, float scale, float* pmax,
                                      float* psum, int64_t group0, cudaStream_t stream);
cudaError_t coma_infonce_grad_weights(int dtype, const float* S, int64_t rows, int64_t m, int64_t lds, float scale,
                                      void* G, int64_t ldg, const float* rlse, const float* rcoef,
                                      const float* clse, const float* ccoef, const int64_t* pidx, const float* pcoef,
                                      cudaStream_t stream);
}

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "infonce cuda: G dtype ", t.scalar_type(), " unsupported; use float32/float16/bfloat16");
  }
  return -1;
}

// S: the fp32 logits chunk [rows, m] with contiguous rows.
void check_logits(const at::Tensor& S) {
  TORCH_CHECK(S.is_cuda() && S.scalar_type() == at::kFloat && S.dim() == 2 && S.stride(1) == 1,
              "infonce cuda: S must be a float32 CUDA matrix [rows, m] with contiguous rows");
}

float* f32(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() >= numel,
              "infonce cuda: ", name, " must be a contiguous float32 CUDA tensor of at least ", numel, " elements");
  return t.data_ptr<float>();
}

void ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "infonce cuda: ", what, " launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

// lse [rows] <- log Σ_c exp(scale · S[r, c]) per row.
void row_lse(const at::Tensor& S, double scale, at::Tensor lse) {
  check_logits(S);
  const c10::cuda::CUDAGuard guard(S.device());
  ok(coma_infonce_row_lse(S.data_ptr<float>(), S.size(0), S.size(1), S.stride(0), static_cast<float>(scale),
                          f32(lse, S.size(0), "lse"), stream()),
     "row_lse");
}

// pmax/psum [groups, m]: rows group0 .. group0 + ceil(rows / rows_per_group) - 1 <- per-column
// (max, sum-exp) of scale · S over each group of rows_per_group rows of S.
void col_partials(const at::Tensor& S, double scale, at::Tensor pmax, at::Tensor psum, int64_t group0) {
  check_logits(S);
  const int64_t rows = S.size(0), m = S.size(1), per = coma_infonce_rows_per_group();
  TORCH_CHECK(pmax.dim() == 2 && pmax.size(1) == m && group0 >= 0 && group0 + (rows + per - 1) / per <= pmax.size(0),
              "infonce cuda: pmax/psum must be [groups, m] with room for this chunk's row groups");
  const c10::cuda::CUDAGuard guard(S.device());
  ok(coma_infonce_col_partials(S.data_ptr<float>(), rows, m, S.stride(0), static_cast<float>(scale),
                               f32(pmax, pmax.numel(), "pmax"), f32(psum, pmax.numel(), "psum"), group0, stream()),
     "col_partials");
}

// G [rows, m] (float32/float16/bfloat16) <- softmax-gradient weights of the chunk's rows, from the
// chunk's slices of rlse/rcoef (and pidx int64 global key indices, pcoef) and the whole-key
// clse/ccoef.
void grad_weights(const at::Tensor& S, double scale, at::Tensor G, const at::Tensor& rlse,
                  const at::Tensor& rcoef, const std::optional<at::Tensor>& clse,
                  const std::optional<at::Tensor>& ccoef, const std::optional<at::Tensor>& pidx,
                  const std::optional<at::Tensor>& pcoef) {
  check_logits(S);
  const int64_t rows = S.size(0), m = S.size(1);
  TORCH_CHECK(G.is_cuda() && G.dim() == 2 && G.size(0) == rows && G.size(1) == m && G.stride(1) == 1,
              "infonce cuda: G must be a CUDA matrix shaped like S with contiguous rows");
  TORCH_CHECK(clse.has_value() == ccoef.has_value(), "infonce cuda: clse and ccoef come together");
  TORCH_CHECK(pidx.has_value() == pcoef.has_value(), "infonce cuda: pidx and pcoef come together");
  if (pidx.has_value())
    TORCH_CHECK(pidx->is_cuda() && pidx->scalar_type() == at::kLong && pidx->is_contiguous() && pidx->numel() >= rows,
                "infonce cuda: pidx must be a contiguous int64 CUDA vector of at least ", rows, " elements");
  const c10::cuda::CUDAGuard guard(S.device());
  ok(coma_infonce_grad_weights(dtype_code(G), S.data_ptr<float>(), rows, m, S.stride(0), static_cast<float>(scale),
                               G.data_ptr(), G.stride(0),
                               f32(rlse, rows, "rlse"), f32(rcoef, rows, "rcoef"),
                               clse ? f32(*clse, m, "clse") : nullptr, ccoef ? f32(*ccoef, m, "ccoef") : nullptr,
                               pidx ? pidx->data_ptr<int64_t>() : nullptr, pcoef ? f32(*pcoef, rows, "pcoef") : nullptr,
                               stream()),
     "grad_weights");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused InfoNCE epilogues over cuBLAS logits chunks (coma_kernels/csrc/infonce_kernels.cu)";
  m.def("rows_per_group", &coma_infonce_rows_per_group, "rows per column-statistics group");
  m.def("row_lse", &row_lse, "row log-sum-exp of scale * S", py::arg("S"), py::arg("scale"), py::arg("lse"));
  m.def("col_partials", &col_partials, "per-column partial (max, sum-exp) over row groups", py::arg("S"),
        py::arg("scale"), py::arg("pmax"), py::arg("psum"), py::arg("group0"));
  m.def("grad_weights", &grad_weights, "softmax-gradient weights G of a logits chunk", py::arg("S"), py::arg("scale"),
        py::arg("G"), py::arg("rlse"), py::arg("rcoef"), py::arg("clse"), py::arg("ccoef"),
        py::arg("pidx"), py::arg("pcoef"));
}
