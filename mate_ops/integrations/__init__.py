"""Integrations with other libraries, each imported only on demand.

- ``mate_ops.integrations.transformers``: a Hugging Face transformers attention backend
  (``attn_implementation="mate"``); needs ``transformers`` installed.

Nothing here is imported by ``import mate_ops``. Context parallelism over
``torch.distributed`` lives in ``mate_ops.distributed``.
"""
