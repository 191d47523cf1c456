"""Install the CoMa training pipeline.

    pip install torch                      # first: pick the build for your machine (CPU or CUDA)
    pip install -e ".[dev]"                # CPU tests, demo, benchmarks
    pip install -e ".[dev,gpu]"            # + flash-attn (CUDA source build)
    COMA_BUILD_CUDA=1 pip install -e .     # + ahead-of-time build of the CUDA InfoNCE extension

Ranges, not pins: GPU clusters bring their own torch/CUDA pairing, and a researcher installs
into an environment of their own.  The libraries whose next major release may change the APIs we
use (transformers, deepspeed, peft) are capped below it.  ``make demo``/``make test``/CI install
the exact versions in ``requirements/cpu-constraints.txt`` on top of these ranges.

Import names: the distribution installs ``pipeline``, ``coma_kernels`` and ``data_prep``; none may
be a name that a dependency installs (Hugging Face's ``kernels``, a transformers dependency, is why
the kernel package is not called ``kernels``).  tests/test_install.py guards it.
"""
import os

from setuptools import find_packages, setup

VERSION = "0.2.0"

ext_modules, cmdclass = [], {}
if os.environ.get("COMA_BUILD_CUDA") == "1":
    # Ahead-of-time build of the same sources coma_kernels/infonce_cuda.py JIT-compiles.
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [
        CUDAExtension(
            name="coma_kernels._infonce_cuda",
            sources=["coma_kernels/csrc/infonce_binding.cpp", "coma_kernels/csrc/infonce_kernels.cu"],
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
    packages=find_packages(include=["pipeline", "pipeline.*", "coma_kernels", "coma_kernels.*", "data_prep", "data_prep.*"]),
    package_data={"coma_kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16,<1",
        "transformers>=5.0,<6",
        "peft>=0.17,<1",
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
        # wandb: tests/test_wandb.py, offline; mteb: tests/test_mteb.py, with tasks defined there
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "wandb>=0.17", "mteb>=2.0,<3"],
        "mteb": ["mteb>=2.0,<3"],  # launch/eval_mteb.py, pipeline/mteb_model.py (base install: no torchvision)
        "gpu": ["flash-attn>=2.6"],
        "wandb": ["wandb>=0.17"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
