// torch binding of infonce_kernels.cu: checks, output allocation, the current CUDA stream.
// Built just-in-time by kernels/infonce_cuda.py (torch.utils.cpp_extension.load + ninja) or
// ahead of time by setup.py with COMA_BUILD_CUDA=1, as the module kernels._infonce_cuda.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <optional>
#include <vector>

extern "C" {
int coma_infonce_rows_per_block();
cudaError_t coma_infonce_row_lse(int dtype, const void* A, const void* B, float* lse, int64_t n_rows, int64_t n_cols,
                                 int64_t D, int64_t lda, int64_t ldb, float scale, cudaStream_t stream);
cudaError_t coma_infonce_grad_rows(int dtype, const void* A, const void* B, float* dA, float* ds_part,
                                   const float* rlse, const float* rcoef, const float* clse, const float* ccoef,
                                   int has_row, int has_col, int want_ds, int64_t n_rows, int64_t n_cols, int64_t D,
                                   int64_t lda, int64_t ldb, int64_t ldda, float scale, float out_scale,
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

void check_pair(const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.is_cuda() && B.is_cuda(), "infonce cuda: inputs must be CUDA tensors");
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(1) == B.size(1), "infonce cuda: expected A [r, D], B [c, D]");
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "infonce cuda: A and B must share a dtype");
  TORCH_CHECK(A.device() == B.device(), "infonce cuda: A and B must be on the same device");
  TORCH_CHECK(A.stride(1) == 1 && B.stride(1) == 1, "infonce cuda: rows must be contiguous");
}

const float* vec(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n,
              "infonce cuda: ", name, " must be a contiguous float32 CUDA vector of length ", n);
  return t->data_ptr<float>();
}

void ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "infonce cuda: ", what, " launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// lse_i = log Σ_j exp(scale · A_i·B_j): A [r, D], B [c, D] → [r] float32.
at::Tensor row_lse(const at::Tensor& A_, const at::Tensor& B_, double scale) {
  const at::Tensor A = A_.contiguous(), B = B_.contiguous();
  check_pair(A, B);
  const c10::cuda::CUDAGuard guard(A.device());
  at::Tensor lse = at::empty({A.size(0)}, A.options().dtype(at::kFloat));
  ok(coma_infonce_row_lse(dtype_code(A), A.data_ptr(), B.data_ptr(), lse.data_ptr<float>(), A.size(0), B.size(0),
                          A.size(1), A.stride(0), B.stride(0), static_cast<float>(scale),
                          c10::cuda::getCurrentCUDAStream().stream()),
     "row_lse");
  return lse;
}

// dA [r, D] float32 (updated in place) += out_scale · G B, ds_part [ceil(r / rows_per_block)]
// float32 = per-block Σ G ⊙ (A Bᵀ); G from the optional row (rlse, rcoef) and column (clse, ccoef) terms.
void grad_rows(const at::Tensor& A_, const at::Tensor& B_, at::Tensor dA, at::Tensor ds_part,
               const std::optional<at::Tensor>& rlse, const std::optional<at::Tensor>& rcoef,
               const std::optional<at::Tensor>& clse, const std::optional<at::Tensor>& ccoef, bool want_ds,
               double scale, double out_scale) {
  const at::Tensor A = A_.contiguous(), B = B_.contiguous();
  check_pair(A, B);
  const int64_t r = A.size(0), c = B.size(0);
  TORCH_CHECK(dA.is_cuda() && dA.scalar_type() == at::kFloat && dA.is_contiguous() && dA.size(0) == r &&
                  dA.size(1) == A.size(1),
              "infonce cuda: dA must be a contiguous float32 [r, D] CUDA tensor");
  const int64_t blocks = (r + coma_infonce_rows_per_block() - 1) / coma_infonce_rows_per_block();
  TORCH_CHECK(!want_ds || (ds_part.is_cuda() && ds_part.scalar_type() == at::kFloat && ds_part.numel() >= blocks),
              "infonce cuda: ds_part must be a float32 CUDA vector of at least ", blocks, " entries");
  TORCH_CHECK(rlse.has_value() == rcoef.has_value() && clse.has_value() == ccoef.has_value(),
              "infonce cuda: statistics and coefficients come in pairs");
  const c10::cuda::CUDAGuard guard(A.device());
  ok(coma_infonce_grad_rows(dtype_code(A), A.data_ptr(), B.data_ptr(), dA.data_ptr<float>(),
                            want_ds ? ds_part.data_ptr<float>() : nullptr, vec(rlse, r, "rlse"),
                            vec(rcoef, r, "rcoef"), vec(clse, c, "clse"), vec(ccoef, c, "ccoef"), rlse.has_value(),
                            clse.has_value(), want_ds, r, c, A.size(1), A.stride(0), B.stride(0), dA.stride(0),
                            static_cast<float>(scale), static_cast<float>(out_scale),
                            c10::cuda::getCurrentCUDAStream().stream()),
     "grad_rows");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused InfoNCE statistics and gradients (see kernels/csrc/infonce_kernels.cu)";
  m.def("rows_per_block", &coma_infonce_rows_per_block, "rows of A handled by one thread block");
  m.def("row_lse", &row_lse, "row log-sum-exp of scale * A @ B.T", py::arg("A"), py::arg("B"), py::arg("scale"));
  m.def("grad_rows", &grad_rows, "dA += out_scale * G @ B and per-block sum(G * A @ B.T)", py::arg("A"),
        py::arg("B"), py::arg("dA"), py::arg("ds_part"), py::arg("rlse"), py::arg("rcoef"), py::arg("clse"),
        py::arg("ccoef"), py::arg("want_ds"), py::arg("scale"), py::arg("out_scale"));
}
