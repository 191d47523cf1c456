"""Install the CoMa training pipeline.

    pip install torch                      # first: pick the build for your machine (CPU or CUDA)
    pip install -e ".[dev]"                # CPU tests, demo, benchmarks
    pip install -e ".[dev,gpu]"            # + flash-attn (CUDA source build)
    COMA_BUILD_CUDA=1 pip install -e .     # + ahead-of-time build of the CUDA InfoNCE extension

Lower bounds only: GPU clusters bring their own torch/CUDA pairing.

Name clash: Hugging Face publishes a distribution called ``kernels`` that transformers
probes for (``is_kernels_available``).  This project ships an import package of the same
name but a distribution called ``coma-pipeline`` whose version is far below the range
transformers accepts, so the probe stays False (tests/test_install.py checks it).
"""
import os

from setuptools import find_packages, setup

VERSION = "0.1.0"  # keep < 0.18: see the name-clash note above

ext_modules, cmdclass = [], {}
if os.environ.get("COMA_BUILD_CUDA") == "1":
    # Ahead-of-time build of the same sources kernels/infonce_cuda.py JIT-compiles.
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [
        CUDAExtension(
            name="kernels._infonce_cuda",
            sources=["kernels/csrc/infonce_binding.cpp", "kernels/csrc/infonce_kernels.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="coma-pipeline",
    version=VERSION,
    description="Compression-then-Matching (CoMa) multimodal embedding training on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "kernels", "kernels.*", "data_prep", "data_prep.*"]),
    package_data={"kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.0",
        "peft>=0.17",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "webdataset>=0.2.100",
        "pillow>=10.0",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "pyarrow>=14.0",
        "scikit-learn>=1.3",  # ships the bundled real dataset (handwritten digits)
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "ninja>=1.11",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "wandb>=0.17"],  # wandb: tests/test_wandb.py, offline
        "gpu": ["flash-attn>=2.6"],
        "wandb": ["wandb>=0.17"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
