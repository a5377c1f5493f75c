"""CUDA-graph capture of a compiled decode step (torch.compile(mode="reduce-overhead")): the
device ops never synchronize with the host, so inductor can capture and replay them."""
import pytest
import torch

import mate_ops  # noqa: F401
from mate_ops import mha_interface as mi


class DecodeStep(torch.nn.Module):
    """Appends one token to paged caches held as buffers (fixed addresses) and attends."""

    def __init__(self, B=4, H=8, Hk=2, D=64, P=16, pages_per_seq=8):
        super().__init__()
        n = B * pages_per_seq
        self.register_buffer("k_cache", torch.randn(n, P, Hk, D, dtype=torch.bfloat16))
        self.register_buffer("v_cache", torch.randn(n, P, Hk, D, dtype=torch.bfloat16))
        self.register_buffer("page_table", torch.randperm(n, dtype=torch.int32).view(B, pages_per_seq))

    def forward(self, q, k, v, cache_seqlens):
        return mi.flash_attn_with_kvcache(q, self.k_cache, self.v_cache, k, v, cache_seqlens=cache_seqlens,
                                          page_table=self.page_table, causal=True)


def test_reduce_overhead_decode_step(device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    torch.manual_seed(0)
    eager = DecodeStep().to(device)
    compiled_mod = DecodeStep().to(device)
    compiled_mod.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_mod, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.utils.counters.clear()
    lens = torch.tensor([5, 17, 40, 63], dtype=torch.int32, device=device)
    for i in range(4):
        q = torch.randn(4, 1, 8, 64, dtype=torch.bfloat16, device=device)
        k, v = torch.randn(4, 1, 2, 64, dtype=torch.bfloat16, device=device), torch.randn(4, 1, 2, 64, dtype=torch.bfloat16, device=device)
        got = step(q, k, v, lens + i).clone()
        want = eager(q, k, v, lens + i)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(compiled_mod.k_cache, eager.k_cache, atol=0, rtol=0)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0, dict(torch._dynamo.utils.counters["inductor"])


class MlaDecodeStep(torch.nn.Module):
    """A FlashMLA decode step (metadata on the device + dense paged decode over a latent cache
    held as a buffer), the way DeepSeek-style models call it."""

    def __init__(self, B=4, Hq=128, P=64, pages_per_seq=6):
        super().__init__()
        n = B * pages_per_seq
        self.register_buffer("k_cache", torch.randn(n, P, 1, 576, dtype=torch.bfloat16))
        self.register_buffer("block_table", torch.randperm(n, dtype=torch.int32).view(B, pages_per_seq))
        self.hq = Hq

    def forward(self, q, cache_seqlens):
        from mate_ops import flash_mla as fm
        meta, splits = fm.get_mla_metadata(cache_seqlens, q.shape[1] * self.hq, 1)
        return fm.flash_mla_with_kvcache(q, self.k_cache, self.block_table, cache_seqlens, 512, meta, splits,
                                         causal=True)


def test_reduce_overhead_mla_decode_step(device):
    """The MLA decode step captures in a CUDA graph: get_mla_metadata and the decode's own
    schedule run on the device, with no host synchronization."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    torch.manual_seed(0)
    eager = MlaDecodeStep().to(device)
    step = torch.compile(eager, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.utils.counters.clear()
    lens = torch.tensor([5, 170, 300, 383], dtype=torch.int32, device=device)
    for i in range(4):
        q = torch.randn(4, 2, 128, 576, dtype=torch.bfloat16, device=device)
        out, lse = step(q, lens - i)
        out_e, lse_e = eager(q, lens - i)
        torch.testing.assert_close(out.clone(), out_e, atol=0, rtol=0)
        torch.testing.assert_close(lse.clone(), lse_e, atol=0, rtol=0)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0, dict(torch._dynamo.utils.counters["inductor"])
