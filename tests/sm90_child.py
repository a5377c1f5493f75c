"""The child-process harness of tests/test_sm90_fmha.py, test_sm90_bwd.py and test_sm90_mla.py.

Each of those files checks a Hopper kernel whose route is picked by an environment variable that
the extension reads once per process, so the checks cannot switch it inside the pytest process:
the file runs its own cases as a script in a child process with the variable set,

    python tests/test_sm90_X.py --device cuda [--only NAME ...] [--list]

which prints one line per case, MARK + json {"name", "ok", "route" or "error"}, and its pytest
tests look each case up in the child's output. This module holds both sides:

- the script side: main() (--device / --only / --list, one result line per case, exit 1 on a
  failed case) and route_seen() (asks the profiler whether the sm90 kernels ran);
- the pytest side: skip_reason() (compute capability 9.0, device kernels and the sm90 kernels
  in the build), child_results_fixture() (one child run per test module, so per session) and
  case_result() (a case's result line, or a failure naming the child's exit when it has none).

The assertions on a case's result stay in the test files. Not a test module itself (no test_
prefix); the test files import it as a sibling, as tests/test_compat_fa3.py imports test_compile.
"""
import argparse
import json
import mmap
import os
import subprocess
import sys

import pytest
import torch

CHILD_TIMEOUT_S = 1800


# ---------------------------------------------------------------- script side --------------

def kernels_run(fn, device):
    """Names of the device kernels fn launches, or None when the profiler reports none."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return names or None


def route_seen(fn, device, sm90_kernels):
    """The kernel route fn takes: "sm90" when it launches a kernel whose name contains each of
    sm90_kernels, "other" when it does not, "unknown" without profiler data (off CUDA)."""
    names = kernels_run(fn, device)
    if names is None:
        return "unknown"
    return "sm90" if all(any(kernel in n for n in names) for kernel in sm90_kernels) else "other"


def main(cases, run_case, mark, description, argv=None):
    """The script side of a test file: runs run_case(spec, device) for the chosen cases and
    prints mark + json per case; a case fails by raising. Returns the exit status."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", nargs="*", help="case names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(c["name"] for c in cases))
        return 0
    import mate_ops  # noqa: F401  (registers torch.ops.mate)
    chosen = [c for c in cases if not a.only or c["name"] in a.only]
    failed = 0
    for spec in chosen:
        try:
            route = run_case(spec, a.device)
            res = {"name": spec["name"], "ok": True, "route": route}
        except Exception as e:  # noqa: BLE001  (every failure is reported per case)
            failed += 1
            res = {"name": spec["name"], "ok": False, "error": f"{type(e).__name__}: {e}"[:4000]}
        print(mark + json.dumps(res), flush=True)
    print(f"{len(chosen) - failed}/{len(chosen)} cases passed on {a.device}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------- pytest side -------------

def build_has_kernels(symbols):
    """Does the compiled extension contain every one of these kernel symbols? (setup.py adds
    arch/sm90 only with the CUTLASS headers and a 9.0a target.)"""
    try:
        import mate_ops._C as ext
        with open(ext.__file__, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return all(m.find(s.encode()) >= 0 for s in symbols)
    except (ImportError, OSError, ValueError):
        return False


def skip_reason(op, symbols, kernels_described):
    """Why the sm90 checks of `op` cannot run here, or None: they need a compute capability 9.0
    GPU, CUDA kernels for op and the sm90 kernel symbols in the build."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs compute capability 9.0, got {torch.cuda.get_device_capability()}"
    import mate_ops  # noqa: F401
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
        return "no CUDA kernels in this build"
    if not build_has_kernels(symbols):
        return f"the build has no {kernels_described} (CUTLASS headers / 9.0a target missing)"
    return None


def run_child(script, mark, env_vars, names=None):
    """Runs `script --device cuda [--only names]` with env_vars added to the environment;
    returns ({case name: result}, the CompletedProcess)."""
    env = dict(os.environ, **env_vars)
    cmd = [sys.executable, os.path.abspath(script), "--device", "cuda"] + (["--only", *names] if names else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith(mark):
            res = json.loads(line[len(mark):])
            results[res["name"]] = res
    return results, proc


def child_results_fixture(script, mark, env_vars, names=None):
    """A module-scoped pytest fixture giving run_child's (results, proc): assign it to a name in
    the test module (that name is the fixture's name). Module scope runs the child once per
    session, and the case tests all read that one run."""
    def results():
        return run_child(script, mark, env_vars, names)
    which = f"{len(names)} cases" if names else "every case"
    settings = " ".join(f"{k}={v}" for k, v in env_vars.items())
    results.__doc__ = f"Runs {which} once in a child process with {settings}."
    return pytest.fixture(scope="module")(results)


def case_result(child, name):
    """The result line of case `name` in a child run; fails the test when the child has none
    (it died before that case, e.g. on a device fault), with its exit status and stderr tail."""
    results, proc = child
    res = results.get(name)
    if res is None:
        pytest.fail(f"no result for {name} (child exit {proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}")
    return res
