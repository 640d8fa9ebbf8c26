// Multi-tensor kernels for parameter lists that are not flat (DeepSpeed-managed parameters).
//
//   ema_lerp:        t_i <- m * t_i + (1 - m) * s_i        fp32 math, m read from device memory;
//                    m == 1 returns before touching memory (a skipped step keeps the teacher exact)
//   clip per tensor: norm_i = ||g_i||_2, coef_i = clip / (norm_i + 1e-6), g_i *= coef_i if coef_i < 1
//
// Launcher (multi-tensor apply): the tensors are cut into chunks of kChunk elements; one CUDA block
// per chunk. Pointers, sizes and the block -> (tensor, chunk) map travel in the kernel arguments
// (a struct under the 4 KB parameter limit), so one launch covers up to kMaxTensors tensors and
// kMaxBlocks chunks, and a ViT-B/8 list (~160 tensors, 109M elements) takes a handful of launches.
//
// Clipping is two passes over the same map, with no host synchronization: pass 1 writes one fp32
// partial sum of squares per chunk into a workspace indexed by a global chunk number; pass 2 sums a
// tensor's partials in a fixed order (deterministic), and scales its chunk only when coef < 1.
//
// This file holds only the math and the launcher, with no torch headers (it compiles in seconds);
// csrc/multi_tensor.cpp holds the checks, dtype grouping, streams and the operator registration.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastdino {

// dtype codes shared with multi_tensor.cpp
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;  // elements per block
constexpr int kThreads = 512;
constexpr int kILP = 4;  // elements per thread per iteration (one 16-byte load for fp32)

template <int N>  // N: tensors per list entry (2 for EMA: teacher, student; 1 for clipping)
struct TensorListMeta {
  void* addr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_base[kMaxTensors];  // global chunk number of the tensor's chunk 0 (clipping)
  int32_t out_index[kMaxTensors];   // where the tensor's norm goes (clipping)
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<2>) <= 4000, "kernel argument struct over the 4 KB limit");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ bool aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP)) == 0;
}

template <typename T>
struct alignas(sizeof(T) * kILP) Vec {
  T v[kILP];
};

// Sum over the block, result valid in every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------
// functors: one chunk of one tensor per block
template <typename T, typename S>
struct EmaOp {
  const float* momentum;
  __device__ void operator()(const TensorListMeta<2>& meta, int t, int64_t chunk) const {
    const float m = *momentum;
    if (m == 1.f) return;  // skipped step: the teacher stays bit-for-bit
    T* tp = static_cast<T*>(meta.addr[0][t]) + chunk * kChunk;
    const S* sp = static_cast<const S*>(meta.addr[1][t]) + chunk * kChunk;
    const int64_t n = min(static_cast<int64_t>(kChunk), meta.numel[t] - chunk * kChunk);
    if (aligned<T>(tp) && aligned<S>(sp) && n % kILP == 0) {
      for (int64_t i = threadIdx.x; i < n / kILP; i += blockDim.x) {
        Vec<T> tv = reinterpret_cast<const Vec<T>*>(tp)[i];
        const Vec<S> sv = reinterpret_cast<const Vec<S>*>(sp)[i];
#pragma unroll
        for (int k = 0; k < kILP; ++k)
          tv.v[k] = from_float<T>(to_float(tv.v[k]) * m + (1.f - m) * to_float(sv.v[k]));
        reinterpret_cast<Vec<T>*>(tp)[i] = tv;
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        tp[i] = from_float<T>(to_float(tp[i]) * m + (1.f - m) * to_float(sp[i]));
    }
  }
};

template <typename G>
struct SumSqOp {
  float* partial;
  __device__ void operator()(const TensorListMeta<1>& meta, int t, int64_t chunk) const {
    const G* gp = static_cast<const G*>(meta.addr[0][t]) + chunk * kChunk;
    const int64_t n = min(static_cast<int64_t>(kChunk), meta.numel[t] - chunk * kChunk);
    float acc = 0.f;
    if (aligned<G>(gp) && n % kILP == 0) {
      for (int64_t i = threadIdx.x; i < n / kILP; i += blockDim.x) {
        const Vec<G> gv = reinterpret_cast<const Vec<G>*>(gp)[i];
#pragma unroll
        for (int k = 0; k < kILP; ++k) acc += to_float(gv.v[k]) * to_float(gv.v[k]);
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += to_float(gp[i]) * to_float(gp[i]);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[meta.chunk_base[t] + chunk] = acc;
  }
};

template <typename G>
struct ScaleOp {
  const float* partial;
  float* norms;
  float clip;
  __device__ void operator()(const TensorListMeta<1>& meta, int t, int64_t chunk) const {
    const int64_t numel = meta.numel[t];
    const int n_chunks = static_cast<int>((numel + kChunk - 1) / kChunk);
    float acc = 0.f;  // the tensor's norm from its partials, same order in every block
    for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) acc += partial[meta.chunk_base[t] + i];
    const float norm = sqrtf(block_sum(acc));
    if (chunk == 0 && threadIdx.x == 0) norms[meta.out_index[t]] = norm;
    const float coef = clip / (norm + 1e-6f);
    if (!(coef < 1.f)) return;  // below the clip (or NaN): untouched, as the official loop
    G* gp = static_cast<G*>(meta.addr[0][t]) + chunk * kChunk;
    const int64_t n = min(static_cast<int64_t>(kChunk), numel - chunk * kChunk);
    if (aligned<G>(gp) && n % kILP == 0) {
      for (int64_t i = threadIdx.x; i < n / kILP; i += blockDim.x) {
        Vec<G> gv = reinterpret_cast<const Vec<G>*>(gp)[i];
#pragma unroll
        for (int k = 0; k < kILP; ++k) gv.v[k] = from_float<G>(to_float(gv.v[k]) * coef);
        reinterpret_cast<Vec<G>*>(gp)[i] = gv;
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) gp[i] = from_float<G>(to_float(gp[i]) * coef);
    }
  }
};

template <int N, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const TensorListMeta<N> meta, Op op) {
  op(meta, meta.block_tensor[blockIdx.x], meta.block_chunk[blockIdx.x]);
}

static void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastdino._C ") + what + ": " + cudaGetErrorString(err));
}

// Multi-tensor apply: walk the tensors chunk by chunk, launching whenever the tensor slots or the
// block slots are full. A tensor cut by a launch stays in slot 0 of the next one.
template <int N, typename Op>
void multi_tensor_apply(int n_tensors, void* const* const* lists, const int64_t* numel, const int32_t* chunk_base,
                        const int32_t* out_index, Op op, cudaStream_t stream, const char* what) {
  TensorListMeta<N> meta;
  int n_slots = 0, n_blocks = 0;
  for (int t = 0; t < n_tensors; ++t) {
    if (numel[t] == 0) continue;
    for (int l = 0; l < N; ++l) meta.addr[l][n_slots] = lists[l][t];
    meta.numel[n_slots] = numel[t];
    meta.chunk_base[n_slots] = chunk_base ? chunk_base[t] : 0;
    meta.out_index[n_slots] = out_index ? out_index[t] : 0;
    const int64_t n_chunks = (numel[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < n_chunks; ++c) {
      meta.block_tensor[n_blocks] = static_cast<int16_t>(n_slots);
      meta.block_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool blocks_full = n_blocks == kMaxBlocks;
      const bool slots_full = n_slots + 1 == kMaxTensors && c == n_chunks - 1;
      if (blocks_full || slots_full) {
        multi_tensor_kernel<N, Op><<<n_blocks, kThreads, 0, stream>>>(meta, op);
        check_launch(what);
        n_blocks = 0;
        if (c == n_chunks - 1) {
          n_slots = -1;  // tensor done: start empty
        } else {  // tensor continues: keep it in slot 0
          for (int l = 0; l < N; ++l) meta.addr[l][0] = meta.addr[l][n_slots];
          meta.numel[0] = meta.numel[n_slots];
          meta.chunk_base[0] = meta.chunk_base[n_slots];
          meta.out_index[0] = meta.out_index[n_slots];
          n_slots = 0;
        }
      }
    }
    ++n_slots;
  }
  if (n_blocks > 0) {
    multi_tensor_kernel<N, Op><<<n_blocks, kThreads, 0, stream>>>(meta, op);
    check_launch(what);
  }
}

// ---------------------------------------------------------------------------------------------
// entry points called by multi_tensor.cpp (plain types: pointers, dtype codes, the stream)
int64_t mt_chunk_size() { return kChunk; }

template <typename T, typename S>
static void ema_typed(int n, void* const* lists[2], const int64_t* numel, const float* momentum, cudaStream_t stream) {
  multi_tensor_apply<2>(n, lists, numel, nullptr, nullptr, EmaOp<T, S>{momentum}, stream, "ema_lerp_");
}

template <typename T>
static void ema_dispatch_student(int n, void* const* lists[2], const int64_t* numel, int student_dtype,
                                 const float* momentum, cudaStream_t stream) {
  switch (student_dtype) {
    case kFloat32: return ema_typed<T, float>(n, lists, numel, momentum, stream);
    case kFloat16: return ema_typed<T, __half>(n, lists, numel, momentum, stream);
    case kBFloat16: return ema_typed<T, __nv_bfloat16>(n, lists, numel, momentum, stream);
    default: throw std::invalid_argument("fastdino._C ema_lerp_: unsupported student dtype code " + std::to_string(student_dtype));
  }
}

void mt_ema_lerp(int n, void* const* teacher, void* const* student, const int64_t* numel, int teacher_dtype,
                 int student_dtype, const float* momentum, cudaStream_t stream) {
  void* const* lists[2] = {teacher, student};
  switch (teacher_dtype) {
    case kFloat32: return ema_dispatch_student<float>(n, lists, numel, student_dtype, momentum, stream);
    case kFloat16: return ema_dispatch_student<__half>(n, lists, numel, student_dtype, momentum, stream);
    case kBFloat16: return ema_dispatch_student<__nv_bfloat16>(n, lists, numel, student_dtype, momentum, stream);
    default: throw std::invalid_argument("fastdino._C ema_lerp_: unsupported teacher dtype code " + std::to_string(teacher_dtype));
  }
}

template <typename G>
static void clip_typed(int n, void* const* grads, const int64_t* numel, const int32_t* chunk_base,
                       const int32_t* out_index, float clip, float* partial, float* norms, cudaStream_t stream) {
  void* const* lists[1] = {grads};
  multi_tensor_apply<1>(n, lists, numel, chunk_base, out_index, SumSqOp<G>{partial}, stream, "clip (norms)");
  multi_tensor_apply<1>(n, lists, numel, chunk_base, out_index, ScaleOp<G>{partial, norms, clip}, stream, "clip (scale)");
}

// partial: workspace of sum_t ceil(numel_t / kChunk) floats; chunk_base: prefix sums of those counts
void mt_clip_per_tensor(int n, void* const* grads, const int64_t* numel, const int32_t* chunk_base,
                        const int32_t* out_index, int dtype, float clip, float* partial, float* norms,
                        cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return clip_typed<float>(n, grads, numel, chunk_base, out_index, clip, partial, norms, stream);
    case kFloat16: return clip_typed<__half>(n, grads, numel, chunk_base, out_index, clip, partial, norms, stream);
    case kBFloat16: return clip_typed<__nv_bfloat16>(n, grads, numel, chunk_base, out_index, clip, partial, norms, stream);
    default: throw std::invalid_argument("fastdino._C clip_grad_per_tensor_: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace fastdino
