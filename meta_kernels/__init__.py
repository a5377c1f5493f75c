"""Fake (meta) kernels of torch.ops.mate.*: output shapes and dtypes from argument sizes only,
so torch.compile and torch.export trace the ops without running them.

One module per op family; importing this package registers all of them. Installed as
``mate_ops.meta_kernels`` (the source folder is ``meta_kernels/``, see setup.py).
"""
from . import fmha, kvcache, mla  # noqa: F401
