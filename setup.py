"""Builds mate_ops._C: the op schemas, the CPU reference kernels and, when a device
toolchain is present, the device kernels of csrc/musa.

    pip install --no-build-isolation -e .      # the README's install command
    python setup.py build_ext --inplace        # rebuild _C only (incremental ninja build)

Project metadata (name, dependencies, licence) is in pyproject.toml; the version is in
mate_ops/_version.py.

Environment knobs:
    MATE_OPS_DEVICE=auto|cpu|cuda|musa   which device kernels to build (auto: detect)
    MATE_OPS_NATIVE_CPU=0                 no -mavx2/-mfma even if this CPU has them
    MAX_JOBS=N                            parallel compile jobs (ninja)
    MATE_OPS_SKIP_EXT=1                   install the Python package only, no _C
                                          (scripts/setup_env.sh builds _C itself)
    MATE_OPS_CUTLASS_INCLUDE=DIR          CUTLASS / CuTe headers for the Hopper kernels of
                                          csrc/musa/arch/sm90 (default: the nvidia-cutlass
                                          package's copy; without either they are skipped)
"""
import glob
import os
import platform

import torch
from setuptools import find_packages, setup
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


def version():
    scope = {}
    with open(os.path.join(ROOT, "mate_ops", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def packages():
    """mate_ops, its subpackages, and meta_kernels/ installed as mate_ops.meta_kernels."""
    subs = ["mate_ops." + p for p in find_packages(os.path.join(ROOT, "mate_ops"))]
    return sorted({"mate_ops", "mate_ops.meta_kernels", *subs})


CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"  # pip install --no-deps (headers only; pyproject.toml says why)


def cutlass_include():
    """The CUTLASS headers (with CuTe) the sm90 kernels build on: MATE_OPS_CUTLASS_INCLUDE, else
    the copy inside the nvidia-cutlass package (found without importing it), else None."""
    path = os.environ.get("MATE_OPS_CUTLASS_INCLUDE")
    if not path:
        import importlib.util  # noqa: PLC0415

        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return path if os.path.isdir(os.path.join(path, "cute")) else None


def extension():
    sources = ["csrc/registration.cpp"] + rel("csrc/common/*.cpp") + rel("csrc/cpu_ref/*.cpp")
    kind = device_kind()
    # csrc/musa: host launchers and portable kernels; arch/sm80: the mma.sync kernels (empty
    # where the compiler has no mma.sync); arch/sm90 (below): the CuTe Hopper kernels
    device_sources = rel("csrc/musa/*.cu") + rel("csrc/musa/arch/sm80/*.cu") + rel("csrc/musa/*.cpp")
    common = dict(
        name="mate_ops._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if kind == "cuda" and device_sources:
        arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        print(f"mate_ops: building CUDA device kernels for {arch}")
        macros = [("MATE_WITH_CUDA", "1")]
        # Hopper kernels (TMA + wgmma, CuTe): only with the CUTLASS headers and a 9.0a target;
        # their bodies compile for sm_90a only (the other targets get empty kernels)
        cutlass = cutlass_include()
        if cutlass and "9.0a" in arch:
            print(f"mate_ops: with the sm90 kernels (CUTLASS headers: {cutlass})")
            device_sources += rel("csrc/musa/arch/sm90/*.cu")
            common["include_dirs"].append(cutlass)
            macros.append(("MATE_WITH_SM90", "1"))
        else:
            print(f"mate_ops: without the sm90 kernels (needs {CUTLASS_PIN} or MATE_OPS_CUTLASS_INCLUDE, "
                  "and 9.0a in TORCH_CUDA_ARCH_LIST)")
        return CUDAExtension(
            sources=sources + device_sources,
            define_macros=macros,
            extra_compile_args={
                "cxx": cpu_flags(),
                # MATE_OPS_NVCC_FLAGS: extra nvcc flags, e.g. -DMATE_SM90_TRACE (the Hopper
                # forward's timeline, docs/performance.md)
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
                + os.environ.get("MATE_OPS_NVCC_FLAGS", "").split(),
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
    version=version(),
    packages=packages(),
    package_dir={"mate_ops": "mate_ops", "mate_ops.meta_kernels": "meta_kernels"},
    ext_modules=[] if os.environ.get("MATE_OPS_SKIP_EXT") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension},
)
