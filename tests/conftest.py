"""Shared pytest fixtures: the device fixture runs every test on each available device."""
import os

import pytest
import torch

import mate_ops  # noqa: F401  (registers torch.ops.mate.*)


def _has_device_kernels(key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("mate::fmha_fwd", key)


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and _has_device_kernels("CUDA"):
        devices.append("cuda")
    if hasattr(torch, "musa") and torch.musa.is_available() and _has_device_kernels("PrivateUse1"):
        devices.append("musa")
    return devices


DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device this build has kernels for: ``cpu`` always, ``cuda``/``musa`` when present.

    A test module whose ops have no device kernels yet names them in ``DEVICE_OPS``
    (default: the FMHA family); devices lacking a kernel for one of them are skipped."""
    ops = getattr(request.module, "DEVICE_OPS", ("mate::fmha_fwd",))
    if request.param != "cpu":
        key = "CUDA" if request.param == "cuda" else "PrivateUse1"
        missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
        if missing:
            pytest.skip(f"no {request.param} kernel yet for {', '.join(missing)}")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger shapes, skipped unless --run-slow")
    config.addinivalue_line(
        "markers",
        "differential_long: thousands of hypothesis examples against the oracle (tests/test_differential.py), "
        "skipped unless --run-long-differential or MATE_DIFFERENTIAL_LONG=1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--run-long-differential", action="store_true",
                     help="also run tests marked differential_long (or set MATE_DIFFERENTIAL_LONG=1; "
                          "MATE_DIFFERENTIAL_EXAMPLES sets the examples per test)")


def _long_differential(config):
    return config.getoption("--run-long-differential") or os.environ.get("MATE_DIFFERENTIAL_LONG", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    run_slow, run_long = config.getoption("--run-slow"), _long_differential(config)
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    skip_long = pytest.mark.skip(reason="differential_long: pass --run-long-differential or set MATE_DIFFERENTIAL_LONG=1")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip)
        if "differential_long" in item.keywords and not run_long:
            item.add_marker(skip_long)
