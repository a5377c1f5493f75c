"""Where a Hopper kernel's spills and instructions are, per warp role, without a GPU.

    python3 scripts/sass_roles.py csrc/musa/arch/sm90/fmha_fwd_sm90_128.cu [more .cu or .cubin]

Compiles each .cu for sm_90a into a cubin (nvcc with the flags of the extension's build;
about half a minute per file) or reads a given .cubin, disassembles it with cuobjdump and prints,
per kernel, the instruction count and the local-memory instructions (STL / LDL: spills) of each
role. The roles are the code between `setmaxnreg` instructions (USETMAXREG): the consumers'
part, which raises its registers, and the producer warpgroup's, which gives them up; `ptxas -v`
only reports a kernel's total. It also prints the largest loops (backward branches), which at
the consumers are the work-tile loop and the steady-state step.

cuobjdump and the nvdisasm it runs are not part of the CUDA compiler package this machine has;
the nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels bring them (scripts/setup_env.sh
installs both; CUOBJDUMP overrides where cuobjdump is looked for).
nvcc and the CUTLASS headers (the nvidia-cutlass package) must be installed.
tests/test_device_sources.py uses kernel_roles to keep the consumers free of spills.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cutlass_include():
    import cutlass_library

    return os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")


def compile_cubin(source, out_dir, nvcc=None):
    cubin = os.path.join(out_dir, os.path.basename(source).replace(".cu", ".cubin"))
    # setup.py's nvcc flags and the ones torch's CUDAExtension adds (no fast math)
    cmd = [nvcc or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-DMATE_WITH_SM90=1",
           "-I" + cutlass_include(), "-I" + os.path.join(ROOT, "csrc"),
           "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-o", cubin, source]
    subprocess.run(cmd, check=True)
    return cubin


def instructions(function_text):
    """(address, instruction) of one function's SASS listing."""
    rows = []
    for line in function_text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2)))
    return rows


def opcode(ins):
    """The opcode of a SASS instruction, without its predicate (@P0, @!P1, @UP2...)."""
    words = ins.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


ROLE_OF = {"USETMAXREG.TRY_ALLOC.CTAPOOL": "consumers", "USETMAXREG.DEALLOC.CTAPOOL": "producer warpgroup"}


def role_parts(rows):
    """[(role, first index, end index)] of (address, instruction) rows: the code between
    `setmaxnreg` instructions (entry, consumers, producer warpgroup)."""
    cuts = [0] + [k for k, (_, ins) in enumerate(rows) if "USETMAXREG" in ins] + [len(rows)]
    return [(ROLE_OF.get(opcode(rows[a][1]), "entry") if b > a else "entry", a, b) for a, b in zip(cuts, cuts[1:])]


def find_loops(rows):
    """[(instructions, first address, last address)] of the loops among (address, instruction) rows,
    largest first: conditional backward branches (the unconditional ones and the short self-jumps
    at a function's end are the out-of-line retries of barrier waits)."""
    loops = []
    for addr, ins in rows:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", ins)
        if m and ins.startswith("@") and addr - int(m.group(1), 16) > 64:
            loops.append(((addr - int(m.group(1), 16)) // 16, int(m.group(1), 16), addr))
    return sorted(loops, reverse=True)


def step_loop(rows, loops):
    """(first, last address) of the steady-state step: the smallest loop holding a wgmma, or None."""
    for _, lo, hi in sorted(loops):
        if any(lo <= addr <= hi and opcode(ins).startswith("HGMMA") for addr, ins in rows):
            return lo, hi
    return None


def kernel_roles(cubin, cuobjdump):
    """Per kernel of the cubin: (name, instruction count, [(role, instructions, STL, LDL)],
    [(loop instructions, first address, last address)] largest first, the steady-state step:
    (first address, last address, STL, LDL) of the smallest loop holding a wgmma, or None)."""
    # cuobjdump runs nvdisasm, which the nvidia-cuda-nvdisasm wheel puts next to it
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
    text = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True, env=env).stdout
    kernels = []
    for part in text.split("Function : ")[1:]:
        name, rows = part.splitlines()[0].strip(), instructions(part)
        roles = []
        for role, a, b in role_parts(rows):
            seg = rows[a:b]
            roles.append((role, b - a, sum(opcode(i).startswith("STL") for _, i in seg),
                          sum(opcode(i).startswith("LDL") for _, i in seg)))
        loops = find_loops(rows)
        step = step_loop(rows, loops)
        if step is not None:
            body = [ins for addr, ins in rows if step[0] <= addr <= step[1]]
            step = (*step, sum(opcode(i).startswith("STL") for i in body), sum(opcode(i).startswith("LDL") for i in body))
        kernels.append((name, len(rows), roles, loops, step))
    return kernels


def report(cubin, cuobjdump):
    for name, count, roles, loops, step in kernel_roles(cubin, cuobjdump):
        print(f"{name[:150]}\n  {count} instructions")
        for role, n, stl, ldl in roles:
            print(f"  {role}: {n} instructions, {stl} STL, {ldl} LDL")
        for size, lo, hi in loops[:3]:
            print(f"  loop {lo:#x}..{hi:#x}: {size} instructions")
        if step is not None:
            print(f"  step loop {step[0]:#x}..{step[1]:#x}: {step[2]} STL, {step[3]} LDL")


def find_cuobjdump():
    """CUOBJDUMP, cuobjdump on PATH, or the one the nvidia-cuda-cuobjdump wheel installed."""
    found = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13", "cuda_cuobjdump"):
                path = os.path.join(base, sub, "bin", "cuobjdump")
                if os.path.isfile(path):
                    return path
    except ImportError:
        pass
    return None


def main():
    cuobjdump = find_cuobjdump()
    if not cuobjdump:
        sys.exit("cuobjdump not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (or set CUOBJDUMP)")
    with tempfile.TemporaryDirectory() as tmp:
        for arg in sys.argv[1:]:
            report(arg if arg.endswith(".cubin") else compile_cubin(arg, tmp), cuobjdump)


if __name__ == "__main__":
    main()
