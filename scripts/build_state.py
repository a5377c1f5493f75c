"""Prints the build state of mate_ops._C for scripts/setup_env.sh, as one line:

    ENV_KEY SOURCE_KEY INSTALLED LOADS

ENV_KEY     hash of what the compiled objects depend on besides our sources: the
            interpreter, torch's version and flavour, the device toolchain, the build knobs
SOURCE_KEY  hash of every file under csrc/ plus setup.py and pyproject.toml
INSTALLED   1 when `import mate_ops` from outside the checkout resolves to this checkout
LOADS       1 when mate_ops/_C*.so of this checkout loads against this torch

Run it from a directory other than the checkout (setup_env.sh runs it from /).
"""
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys

import torch

KNOBS = ("MATE_OPS_DEVICE", "MATE_OPS_NATIVE_CPU", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX", "CC")


def env_key():
    parts = [
        sys.executable,
        sys.version,
        torch.__version__,
        str(torch.version.cuda),
        str(getattr(torch.version, "hip", None)),
        str(importlib.util.find_spec("torch_musa") is not None),
        str(shutil.which("nvcc")),
    ] + [f"{k}={os.environ.get(k, '')}" for k in KNOBS]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def source_key(root):
    paths = ["setup.py", "pyproject.toml"]
    for d, dirs, files in os.walk(os.path.join(root, "csrc")):
        dirs.sort()
        paths += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files)]
    h = hashlib.sha256()
    for p in paths:
        full = os.path.join(root, p)
        if os.path.isfile(full):
            h.update(p.encode() + b"\0")
            with open(full, "rb") as f:
                h.update(f.read())
            h.update(b"\0")
    return h.hexdigest()[:16]


def installed(root):
    spec = importlib.util.find_spec("mate_ops")
    want = os.path.realpath(os.path.join(root, "mate_ops", "__init__.py"))
    return spec is not None and spec.origin is not None and os.path.realpath(spec.origin) == want


def loads(root):
    try:
        spec = importlib.machinery.PathFinder.find_spec("_C", [os.path.join(root, "mate_ops")])
        importlib.util.module_from_spec(spec)  # runs the extension's init (the registrations)
        return True
    except Exception:  # noqa: BLE001  missing, stale (undefined symbol) or built for another torch
        return False


if __name__ == "__main__":
    root = os.path.realpath(sys.argv[1])
    print(env_key(), source_key(root), int(installed(root)), int(loads(root)))
