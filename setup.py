"""fastdino: a fast, exact DINO training engine.

`kernels/` installs as `fastdino.kernels` (a bare top-level `kernels` package exists on PyPI).
The CUDA extension `fastdino._C` (csrc/) is built only where nvcc and a CUDA torch are present.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTDINO_BUILD_CUDA", "auto") != "0":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

        if torch.version.cuda is not None and CUDA_HOME is not None:
            ext_modules = [
                CUDAExtension(
                    "fastdino._C",
                    ["csrc/multi_tensor.cpp", "csrc/multi_tensor_kernel.cu"],
                    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
                )
            ]
            cmdclass = {"build_ext": BuildExtension}
    except ImportError:  # torch not installed yet: pure-Python install
        pass

setup(
    name="fastdino",
    version="0.1.0",
    description="Fast, exact DINO self-supervised ViT training: fused Triton loss, flat EMA, DALI, DeepSpeed",
    python_requires=">=3.10",
    packages=["fastdino", "fastdino.models", "fastdino.losses", "fastdino.compat", "fastdino.data", "fastdino.eval",
              "fastdino.kernels"],
    package_dir={"fastdino": "fastdino", "fastdino.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "pillow", "tqdm"],
    extras_require={
        "test": ["pytest", "triton>=3.0"],
        "gpu": ["triton>=3.0", "nvidia-ml-py"],
        "dali": ["nvidia-dali-cuda130"],
        # model.attn=flash_attn_4: FlashAttention-4 (CuTe DSL), a pre-release: the exact version this code was written
        # against (fastdino.models.attention.FLASH_ATTN_4_VERSION); cu13 for CUDA 13 builds of torch
        "fa4": ["flash-attn-4[cu13]==4.0.0b36"],
        "deepspeed": ["deepspeed>=0.14"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "export": ["safetensors", "transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
