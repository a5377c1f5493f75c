"""Builds mate_ops._C: the op schemas, the CPU reference kernels and, when a device
toolchain is present, the device kernels of csrc/musa.

    pip install --no-build-isolation -e .      # the README's install command

Environment knobs:
    MATE_OPS_DEVICE=auto|cpu|cuda|musa   which device kernels to build (auto: detect)
    MATE_OPS_NATIVE_CPU=0                 no -mavx2/-mfma even if this CPU has them
    MAX_JOBS=N                            parallel compile jobs (ninja)
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cpu_flags():
    """-O3 and OpenMP (at::parallel_for's pragmas), plus AVX2/FMA when this x86 CPU has them."""
    # no-trapping-math lets the compiler if-convert the float selects of fast_exp (vectorizes)
    flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("MATE_OPS_NATIVE_CPU", "1") != "0":
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
            if " avx2" in info and " fma" in info:
                flags += ["-mavx2", "-mfma", "-mf16c"]
        except OSError:
            pass
    return flags


def device_kind():
    want = os.environ.get("MATE_OPS_DEVICE", "auto")
    if want != "auto":
        return want
    try:
        import torch_musa  # noqa: F401

        return "musa"
    except ImportError:
        pass
    if torch.version.cuda and CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "cuda"
    return "cpu"


def extension():
    sources = ["csrc/registration.cpp"] + rel("csrc/common/*.cpp") + rel("csrc/cpu_ref/*.cpp")
    kind = device_kind()
    device_sources = rel("csrc/musa/*.cu") + rel("csrc/musa/*.cpp")
    common = dict(
        name="mate_ops._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if kind == "cuda" and device_sources:
        arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        print(f"mate_ops: building CUDA device kernels for {arch}")
        return CUDAExtension(
            sources=sources + device_sources,
            define_macros=[("MATE_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cpu_flags(),
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            **common,
        )
    if kind == "musa" and device_sources:
        from torch_musa.utils.musa_extension import MUSAExtension  # noqa: PLC0415

        print("mate_ops: building MUSA device kernels (untested path, see README)")
        return MUSAExtension(
            sources=sources + device_sources,
            define_macros=[("MATE_WITH_MUSA", "1")],
            extra_compile_args={"cxx": cpu_flags(), "mcc": ["-O3", "-std=c++17"]},
            **common,
        )
    print("mate_ops: building the CPU reference only")
    return CppExtension(sources=sources, extra_compile_args={"cxx": cpu_flags()}, **common)


setup(
    name="mate_ops",
    version="0.1.0",
    description="torch.ops.mate: MATE / FlashAttention-3 / FlashMLA attention ops with CPU "
    "reference, device and fake kernels",
    packages=["mate_ops", "mate_ops.meta_kernels", "mate_ops.testing"],
    package_dir={"mate_ops": "mate_ops", "mate_ops.meta_kernels": "meta_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.7"],
    extras_require={"test": ["pytest", "expecttest", "ninja"]},
    python_requires=">=3.9",
)
