"""Attention for the ViT blocks: one switch over the PyTorch SDPA kernels and the flash-attn packages.

    out = softmax(q k^T * scale) v,     q, k, v: (rows, heads, seq, head_dim),  scale = head_dim^-0.5

Backends (config model.attn):
    flash_attn      flash-attn package: flash_attn_qkvpacked_func, or flash_attn_varlen_qkvpacked_func
                    over the packed multi-crop tokens (one call for all crops, cu_seqlens per crop)
    flash_attn_4    flash-attn-4 package (FlashAttention-4, CuTe DSL, a pre-release pinned by the `fa4` extra;
                    Hopper and Blackwell kernels): flash_attn.cute's flash_attn_func, or flash_attn_varlen_func
                    over the packed multi-crop tokens; q, k and v are strided views of the fused qkv
                    projection's output (no copies), the output is written packed (T, heads, head_dim)
    sdpa_flash      torch SDPA, FlashAttention kernel only (CUDA fp16/bf16; PyTorch also has a CPU one)
    sdpa_cudnn      torch SDPA, cuDNN attention only (CUDA)
    sdpa_efficient  torch SDPA, memory-efficient kernel only (CUDA, any float dtype)
    sdpa            torch SDPA, PyTorch's own dispatch (picks one of the above, else math)
    math            torch SDPA, math kernel only: materializes the (seq x seq) matrix (reference speed)
    auto            resolved at build: on CUDA, the fastest fused backend for the model's global-crop
                    shape, timed once (fwd+bwd, bf16) and checked against the reference; on CPU, sdpa

The fused kernels never store the attention matrix: backward recomputes it from q, k, v and the
per-row log-sum-exp. The matrix is only ever materialized by `attention_ref` (tests, the
visualization path get_last_selfattention) and by the `math` backend.

flash_attn, flash_attn_4, sdpa_flash and sdpa_cudnn take fp16/bf16 on CUDA: an fp32 call (e.g. an fp32
evaluation) of a model built with one of them runs through torch's own SDPA dispatch instead; so does a CPU
call of a model built with a CUDA-only backend (flash_attn, flash_attn_4, sdpa_cudnn, sdpa_efficient: `auto`
on a CUDA machine picks one of them even for a model that then runs on CPU).

Packed multi-crop layout: tokens of all crops concatenated as (T, 3*dim) qkv rows, described by
`groups` = ((rows_0, seq_0), (rows_1, seq_1), ...): rows_g sequences of seq_g tokens each, in order.
Attention never crosses a sequence: flash_attn and flash_attn_4 get cu_seqlens (variable-length attention),
the SDPA backends run one call per group (a group is a dense (rows_g, heads, seq_g, head_dim) batch).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None

BACKENDS = ("auto", "flash_attn", "flash_attn_4", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa", "math")
_SDPA_KERNEL = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
# CUDA kernels that take fp16/bf16 only: fp32 inputs (an fp32 evaluation) go to torch's dispatch
_HALF_ONLY = ("flash_attn", "flash_attn_4", "sdpa_flash", "sdpa_cudnn")
_CUDA_ONLY = ("flash_attn", "flash_attn_4", "sdpa_cudnn", "sdpa_efficient")
# Backends that take packed multi-crop tokens in one variable-length call (the models pass them cu_seqlens)
VARLEN_BACKENDS = ("flash_attn", "flash_attn_4")
# Candidates `auto` times on CUDA (benchmarks/attention.py shows the full comparison).
AUTO_CANDIDATES = ("flash_attn", "flash_attn_4", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient")
FLASH_ATTN_4_VERSION = "4.0.0b36"  # the pre-release pinned by setup.py's fa4 extra


class AttentionBackendError(ValueError):
    """An attention backend that cannot run here: the message is one line naming model.attn."""


# ------------------------------------------------------------------------------------------------
# Reference: explicit softmax, fp32 math (tests and the visualization path)
# ------------------------------------------------------------------------------------------------
def attention_weights_ref(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) in fp32 (fp64 for fp64 inputs): (rows, heads, seq, seq). The matrix the
    fused kernels never store."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = torch.promote_types(q.dtype, torch.float32)
    return torch.softmax((q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale, dim=-1)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with fp32 (or fp64) math, returned in q's dtype. q, k, v: (rows, heads, seq, head_dim)."""
    a = attention_weights_ref(q, k, scale)
    return (a @ v.to(a.dtype)).to(q.dtype)


def packed_attention_ref(qkv: torch.Tensor, groups, num_heads: int) -> torch.Tensor:
    """Reference for packed_attention: each sequence separately through attention_ref. (T, 3*dim) -> (T, dim)."""
    dim = qkv.shape[-1] // 3
    outs, start = [], 0
    for rows, seq in groups:
        for _ in range(rows):
            q, k, v = qkv[start:start + seq].view(seq, 3, num_heads, dim // num_heads).permute(1, 2, 0, 3)
            outs.append(attention_ref(q, k, v).transpose(0, 1).reshape(seq, dim))
            start += seq
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------
# Availability: checked once at model build, so a wrong model.attn fails before training starts
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flash_attn_module():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_qkvpacked_func, flash_attn_varlen_qkvpacked_func
    except ImportError:
        return None
    return flash_attn_qkvpacked_func, flash_attn_varlen_qkvpacked_func


@functools.lru_cache(maxsize=None)
def _flash_attn_4_module():
    """(flash_attn_func, flash_attn_varlen_func) of the flash-attn-4 package (flash_attn.cute), or None."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception:  # ImportError, or a CuTe DSL / CUDA bindings mismatch raised at import
        return None
    return flash_attn_func, flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _sdpa_probe(name: str, device_type: str) -> str | None:
    """Run a tiny SDPA call with only this kernel enabled (fwd+bwd); None if it works, else why not."""
    if sdpa_kernel is None:
        return "torch.nn.attention.sdpa_kernel needs torch >= 2.3"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    q = torch.randn(1, 2, 17, 64, device=device_type, dtype=dtype, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns once per disabled kernel; we report ourselves
            with sdpa_kernel(getattr(SDPBackend, _SDPA_KERNEL[name])):
                F.scaled_dot_product_attention(q, q, q).sum().backward()
    except RuntimeError as e:
        return str(e).splitlines()[0][:160]
    return None


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_unavailable(name: str, device_type: str) -> str | None:
    """None if backend `name` can run on `device_type`, else a short reason."""
    if name in ("sdpa", "math"):
        return None if name == "sdpa" or sdpa_kernel is not None else "needs torch >= 2.3"
    if name == "flash_attn":
        if device_type != "cuda" or not torch.cuda.is_available():
            return "flash-attn runs on CUDA only"
        if _flash_attn_module() is None:
            return "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"
        return None
    if name == "flash_attn_4":
        if device_type != "cuda" or not torch.cuda.is_available():
            return "flash-attn-4 runs on CUDA only"
        if torch.cuda.get_device_capability()[0] < 9:  # 4.0.0b36's backward asserts 9.x-12.x
            return "flash-attn-4's backward needs compute capability 9.0 or newer (Hopper, Blackwell)"
        if _flash_attn_4_module() is None:
            return (f"the flash-attn-4 package is not installed "
                    f"(pip install -e '.[fa4]': flash-attn-4=={FLASH_ATTN_4_VERSION})")
        return None
    if name in _SDPA_KERNEL:
        return _sdpa_probe(name, device_type)
    return f"unknown backend (choose one of {list(BACKENDS)})"


@functools.lru_cache(maxsize=None)
def fastest_cuda_backend(seq: int, num_heads: int, head_dim: int, device_index: int = 0) -> str:
    """Time fwd+bwd of every available fused backend on (rows, heads, seq, head_dim) bf16 with
    ~64k tokens; return the fastest whose output matches the fp32 reference. Once per shape and
    process; under torch.distributed rank 0's choice is broadcast so all ranks run the same kernel."""
    names = [b for b in AUTO_CANDIDATES if backend_unavailable(b, "cuda") is None]
    rows = max(1, 65536 // seq)
    dim = num_heads * head_dim
    gen = torch.Generator(device=f"cuda:{device_index}").manual_seed(0)
    qkv = torch.randn(rows * seq, 3 * dim, device=f"cuda:{device_index}", dtype=torch.bfloat16, generator=gen)
    qkv.requires_grad_()
    grad = torch.randn(rows * seq, dim, device=qkv.device, dtype=torch.bfloat16, generator=gen)
    groups = ((rows, seq),)
    ref = packed_attention_ref(qkv[:2 * seq].detach(), ((2, seq),), num_heads).float()
    times = []
    for name in names:
        try:
            out = packed_attention(qkv, groups, num_heads, name)
            if (out[:2 * seq].float() - ref).abs().max().item() > 2e-2 * ref.abs().max().item() + 1e-2:
                continue  # a kernel that is wrong on this shape is never chosen
            for _ in range(3):
                packed_attention(qkv, groups, num_heads, name).backward(grad)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                packed_attention(qkv, groups, num_heads, name).backward(grad)
            end.record()
            end.synchronize()
            times.append((start.elapsed_time(end), name))
        except (RuntimeError, ValueError):
            continue
    best = min(times)[1] if times else "sdpa"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        choice = torch.tensor([BACKENDS.index(best)], device=qkv.device)
        dist.broadcast(choice, src=0)
        best = BACKENDS[int(choice.item())]
    return best


def resolve_backend(name: str, device_type: str | None = None, shape: tuple[int, int, int] | None = None) -> str:
    """Check model.attn=`name` on the device (default: cuda if available, else cpu) and resolve
    `auto` (on CUDA with shape=(seq, heads, head_dim): the fastest measured backend, else sdpa).
    Raises AttentionBackendError (one line) for an unknown or unavailable backend."""
    device_type = device_type or default_device_type()
    if name not in BACKENDS:
        raise AttentionBackendError(f"model.attn={name!r}: unknown attention backend (choose one of {list(BACKENDS)})")
    if name == "auto":
        if device_type == "cuda" and shape is not None and torch.cuda.is_available():
            return fastest_cuda_backend(*shape, torch.cuda.current_device())
        return "sdpa"
    why = backend_unavailable(name, device_type)
    if why is not None:
        raise AttentionBackendError(f"model.attn={name!r} is not available on {device_type}: {why}")
    return name


# ------------------------------------------------------------------------------------------------
# The fast path
# ------------------------------------------------------------------------------------------------
def _sdpa(q, k, v, backend: str):
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    try:
        with sdpa_kernel(getattr(SDPBackend, _SDPA_KERNEL[backend])):
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as e:
        if "No available kernel" not in str(e) and "No viable backend" not in str(e):
            raise
        if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
            # some kernel versions (cuDNN) refuse the strided q/k/v views of the packed qkv: copy once
            return _sdpa(q.contiguous(), k.contiguous(), v.contiguous(), backend)
        raise AttentionBackendError(
            f"model.attn={backend!r} cannot run q of shape {tuple(q.shape)}, dtype {q.dtype} on {q.device.type} "
            f"(try model.attn=sdpa or auto)") from None


def flash_attn_4_packed(qkv: torch.Tensor, groups, num_heads: int, cu_seqlens: torch.Tensor | None = None,
                        max_seqlen: int = 0, module=None) -> torch.Tensor:
    """flash_attn_4's packed attention: (T, 3*dim) -> (T, dim). q, k, v are strided views of qkv (token stride
    3*dim, last dim contiguous and 16-byte aligned: FlashAttention-4 takes them without a copy); one group is a
    dense (rows, seq, heads, head_dim) call, several are one variable-length call over cu_seqlens. `module`:
    (flash_attn_func, flash_attn_varlen_func), default the flash-attn-4 package's."""
    dense, varlen = module or _flash_attn_4_module()
    T, dim3 = qkv.shape
    head_dim = dim3 // 3 // num_heads
    if len(groups) == 1:  # one resolution: dense batch, no cu_seqlens needed
        rows, seq = groups[0]
        q, k, v = qkv.view(rows, seq, 3, num_heads, head_dim).unbind(2)
        out = dense(q, k, v)[0]
    else:
        if cu_seqlens is None:
            raise ValueError("packed_attention: flash_attn_4 over several groups needs cu_seqlens")
        q, k, v = qkv.view(T, 3, num_heads, head_dim).unbind(1)
        out = varlen(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                     max_seqlen_k=max_seqlen)[0]
    return out.reshape(T, dim3 // 3)


def packed_attention(qkv: torch.Tensor, groups, num_heads: int, backend: str,
                     cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0) -> torch.Tensor:
    """Attention over packed sequences.

    qkv: (T, 3*dim), rows laid out as (token, [q|k|v], head, head_dim) like the standard ViT qkv
    Linear; groups: ((rows_g, seq_g), ...) with sum rows_g*seq_g = T; cu_seqlens (int32, rows+1)
    and max_seqlen are needed by the VARLEN_BACKENDS only. Returns (T, dim).
    """
    T, dim3 = qkv.shape
    dim = dim3 // 3
    head_dim = dim // num_heads
    if backend == "flash_attn" and qkv.dtype in (torch.float16, torch.bfloat16):
        dense, varlen = _flash_attn_module()
        if len(groups) == 1:  # one resolution: dense batch, no cu_seqlens needed
            rows, seq = groups[0]
            out = dense(qkv.view(rows, seq, 3, num_heads, head_dim))
        else:
            if cu_seqlens is None:
                raise ValueError("packed_attention: flash_attn over several groups needs cu_seqlens")
            out = varlen(qkv.view(T, 3, num_heads, head_dim), cu_seqlens, max_seqlen)
        return out.reshape(T, dim)
    if backend == "flash_attn_4" and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_4_packed(qkv, groups, num_heads, cu_seqlens, max_seqlen)
    if backend in _HALF_ONLY and qkv.is_cuda and qkv.dtype not in (torch.float16, torch.bfloat16):
        backend = "sdpa"  # an fp32 pass (e.g. fp32 evaluation) of a half-precision kernel: torch's dispatch
    if backend in _CUDA_ONLY and not qkv.is_cuda:
        backend = "sdpa"  # a model built on a CUDA machine run on CPU (evaluation, export): torch's dispatch
    outs, start = [], 0
    for rows, seq in groups:
        # (rows, seq, 3, heads, hd) -> 3 x (rows, heads, seq, hd): strided views, last dim contiguous
        q, k, v = qkv[start:start + rows * seq].view(rows, seq, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = _sdpa(q, k, v, backend)  # (rows, heads, seq, hd)
        outs.append(out.transpose(1, 2).reshape(rows * seq, dim))
        start += rows * seq
    if start != T:
        raise ValueError(f"packed_attention: groups {groups} cover {start} tokens, qkv has {T}")
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def cu_seqlens_for(groups, device) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts (int32, n_seq+1) and the longest sequence, for the VARLEN_BACKENDS."""
    lens = torch.tensor([seq for rows, seq in groups for _ in range(rows)], dtype=torch.int32)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=cu[1:])
    return cu.to(device, non_blocking=True), max(seq for _, seq in groups)


def varlen_args(cache: dict, backend: str, groups, device) -> tuple[torch.Tensor | None, int]:
    """(cu_seqlens, max_seqlen) of a packed layout for a VARLEN_BACKENDS backend, made once per (layout, device)
    and kept in `cache` (no host-to-device copy in the step); (None, 0) when the backend does not take them or
    the layout is one group (a dense call)."""
    if backend not in VARLEN_BACKENDS or len(groups) < 2:
        return None, 0
    key = (tuple(groups), device)
    if key not in cache:
        cache[key] = cu_seqlens_for(groups, device)
    return cache[key]
