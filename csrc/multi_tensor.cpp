// fastdino._C: thin binding for the multi-tensor kernels in multi_tensor_kernel.cu.
//
//   torch.ops.fastdino.ema_lerp_(Tensor(a!)[] teacher, Tensor[] student, Tensor momentum) -> ()
//       teacher_i <- m teacher_i + (1 - m) student_i; fp32 math; any mix of fp32/fp16/bf16;
//       momentum: 0-dim fp32 tensor on the same CUDA device (m == 1: teacher untouched)
//   torch.ops.fastdino.clip_grad_per_tensor_(Tensor(a!)[] grads, float clip) -> Tensor
//       g_i <- g_i * min(1, clip / (||g_i|| + 1e-6)) when that is < 1; returns the norms (n,) fp32
//
// Here: shape/dtype/device guards, grouping by dtype (one launcher call per dtype combination),
// the current stream, and registration with torch.library (fake impls in fastdino/multi_tensor.py).
// No host synchronization: the host only reads sizes and pointers.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

namespace fastdino {

// defined in multi_tensor_kernel.cu (plain types, so that file needs no torch headers)
int64_t mt_chunk_size();
void mt_ema_lerp(int n, void* const* teacher, void* const* student, const int64_t* numel, int teacher_dtype,
                 int student_dtype, const float* momentum, cudaStream_t stream);
void mt_clip_per_tensor(int n, void* const* grads, const int64_t* numel, const int32_t* chunk_base,
                        const int32_t* out_index, int dtype, float clip, float* partial, float* norms,
                        cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t, const char* what, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "fastdino::", what, ": tensor ", i, " has dtype ", t.scalar_type(),
                         ", expected float32, float16 or bfloat16");
  }
  return -1;
}

void check_tensor(const at::Tensor& t, const at::Device& device, const char* what, size_t i) {
  TORCH_CHECK(t.is_cuda(), "fastdino::", what, ": tensor ", i, " is on ", t.device(), ", expected CUDA");
  TORCH_CHECK(t.device() == device, "fastdino::", what, ": tensor ", i, " is on ", t.device(), ", tensor 0 on ", device);
  TORCH_CHECK(t.is_contiguous(), "fastdino::", what, ": tensor ", i, " is not contiguous");
}

void ema_lerp_(at::TensorList teacher, at::TensorList student, const at::Tensor& momentum) {
  TORCH_CHECK(teacher.size() == student.size(), "fastdino::ema_lerp_: ", teacher.size(), " teacher tensors but ",
              student.size(), " student tensors");
  if (teacher.empty()) return;
  const at::Device device = teacher[0].device();
  TORCH_CHECK(momentum.numel() == 1 && momentum.scalar_type() == at::kFloat && momentum.device() == device,
              "fastdino::ema_lerp_: momentum must be a 1-element float32 tensor on ", device, ", got ",
              momentum.scalar_type(), " ", momentum.sizes(), " on ", momentum.device());
  // group the pairs by (teacher dtype, student dtype): one launcher call per group
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < teacher.size(); ++i) {
    check_tensor(teacher[i], device, "ema_lerp_ (teacher)", i);
    check_tensor(student[i], device, "ema_lerp_ (student)", i);
    TORCH_CHECK(teacher[i].numel() == student[i].numel(), "fastdino::ema_lerp_: tensor ", i, " has ",
                teacher[i].numel(), " elements in the teacher, ", student[i].numel(), " in the student");
    groups[{dtype_code(teacher[i], "ema_lerp_", i), dtype_code(student[i], "ema_lerp_", i)}].push_back(i);
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [codes, idx] : groups) {
    std::vector<void*> t_ptrs, s_ptrs;
    std::vector<int64_t> numel;
    for (size_t i : idx) {
      t_ptrs.push_back(teacher[i].data_ptr());
      s_ptrs.push_back(const_cast<void*>(student[i].const_data_ptr()));
      numel.push_back(teacher[i].numel());
    }
    mt_ema_lerp(static_cast<int>(idx.size()), t_ptrs.data(), s_ptrs.data(), numel.data(), codes.first, codes.second,
                momentum.const_data_ptr<float>(), stream);
  }
}

at::Tensor clip_grad_per_tensor_(at::TensorList grads, double clip) {
  TORCH_CHECK(clip >= 0, "fastdino::clip_grad_per_tensor_: clip must be >= 0, got ", clip);
  if (grads.empty()) return at::zeros({0}, at::TensorOptions().dtype(at::kFloat));
  const at::Device device = grads[0].device();
  std::map<int, std::vector<size_t>> groups;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_tensor(grads[i], device, "clip_grad_per_tensor_", i);
    groups[dtype_code(grads[i], "clip_grad_per_tensor_", i)].push_back(i);
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor norms = at::zeros({static_cast<int64_t>(grads.size())}, fopts);  // empty tensors keep norm 0
  const int64_t chunk = mt_chunk_size();
  for (const auto& [code, idx] : groups) {
    std::vector<void*> ptrs;
    std::vector<int64_t> numel;
    std::vector<int32_t> chunk_base, out_index;
    int64_t n_chunks = 0;
    for (size_t i : idx) {
      ptrs.push_back(grads[i].data_ptr());
      numel.push_back(grads[i].numel());
      chunk_base.push_back(static_cast<int32_t>(n_chunks));
      out_index.push_back(static_cast<int32_t>(i));
      n_chunks += (grads[i].numel() + chunk - 1) / chunk;
    }
    TORCH_CHECK(n_chunks < (int64_t{1} << 31), "fastdino::clip_grad_per_tensor_: too many elements");
    at::Tensor partial = at::empty({std::max<int64_t>(n_chunks, 1)}, fopts);
    mt_clip_per_tensor(static_cast<int>(idx.size()), ptrs.data(), numel.data(), chunk_base.data(), out_index.data(),
                       code, static_cast<float>(clip), partial.data_ptr<float>(), norms.data_ptr<float>(), stream);
  }
  return norms;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdino, m) {  // a fragment: other fastdino ops may share the namespace
  m.def("ema_lerp_(Tensor(a!)[] teacher, Tensor[] student, Tensor momentum) -> ()");
  m.def("clip_grad_per_tensor_(Tensor(a!)[] grads, float clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdino, CUDA, m) {
  m.impl("ema_lerp_", &ema_lerp_);
  m.impl("clip_grad_per_tensor_", &clip_grad_per_tensor_);
}

}  // namespace fastdino

// `import fastdino._C` loads this library (and with it the registrations above); no Python API.
static PyModuleDef fastdino_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastdino CUDA multi-tensor kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdino_c_module); }
