"""mate_ops: every attention entry point of Moore Threads' MATE as ``torch.ops.mate.*``
custom ops (C++ CPU reference, device kernels, fake kernels), plus drop-in Python APIs.

Importing the package registers the ops and their fake kernels.
"""
import torch  # noqa: F401  (the extension links against torch)

from . import _C  # noqa: F401  registers the schemas and the compiled kernels
from . import meta_kernels  # noqa: F401  registers the fake kernels
from . import _autograd  # noqa: F401  registers fmha_fwd's backward (fmha_bwd)
from . import compat, flash_attn_interface, flash_mla, flashinfer, flashmla, metal_flash_sdpa  # noqa: F401
from . import mha_interface, mla_fp8  # noqa: F401
from .mha_interface import (  # noqa: F401
    flash_attn_combine,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
)

from ._version import __version__
