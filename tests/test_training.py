"""End-to-end training on the CPU (and on a CUDA GPU) through the mate ops (issue 15, point 5).

A tiny causal language model trains a few steps through FA3's ``flash_attn_func``, MATE's
``flash_attn_varlen_func`` (packed sequences), ``torch.compile`` and the transformers backend:
the loss decreases, and the gradients equal those of the same model on
``torch.nn.functional.scaled_dot_product_attention``.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import mate_ops  # noqa: F401
from mate_ops.flash_attn_interface import flash_attn_func
from mate_ops.mha_interface import flash_attn_varlen_func

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 64, 32, 4, 2, 2


def _sdpa(q, k, v):  # (B, S, H, D) in and out, GQA by repeating kv heads
    g = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _fa3(q, k, v):
    return flash_attn_func(q, k, v, causal=True)


def _mate_varlen(q, k, v):  # every batch row as one packed sequence
    B, S = q.shape[:2]
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, S, S, causal=True)
    return out.view(B, S, *out.shape[1:])


class TinyLM(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        hd = DIM // HEADS
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(DIM, DIM + 2 * KV_HEADS * hd) for _ in range(LAYERS))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(DIM, DIM) for _ in range(LAYERS))
        self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(DIM) for _ in range(LAYERS))
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x = self.emb(tokens)
        B, S, _ = x.shape
        hd = DIM // HEADS
        for qkv, proj, norm in zip(self.qkv, self.proj, self.norm):
            q, k, v = qkv(norm(x)).split([DIM, KV_HEADS * hd, KV_HEADS * hd], -1)
            o = self.attn(q.view(B, S, HEADS, hd), k.view(B, S, KV_HEADS, hd), v.view(B, S, KV_HEADS, hd))
            x = x + proj(o.reshape(B, S, DIM))
        return self.head(x)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _train(model, tokens, steps=8, precision=contextlib.nullcontext):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        # a fresh autocast context per step: autocast caches the low-precision weight copies
        # until its context exits, so one context around all steps would train stale weights
        with precision():
            loss = _loss(model, tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _check_trains_like_sdpa(attn, device="cpu", bf16=False):
    """One step gives SDPA's gradients, a few steps decrease the loss along SDPA's path.
    bf16: under autocast (a fresh context per step, see _train), with bf16-sized tolerances."""
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (3, 25), device=device)
    ref = TinyLM(_sdpa).to(device)
    ours = copy.deepcopy(ref)
    ours.attn = {"fa3": _fa3, "mate_varlen": _mate_varlen, "fa3_compiled": _fa3}[attn]
    run = ours
    if attn == "fa3_compiled":
        torch._dynamo.reset()
        run = torch.compile(ours, fullgraph=True)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with ctx():
        g_ref = torch.autograd.grad(_loss(ref, tokens), list(ref.parameters()))
        g_ours = torch.autograd.grad(_loss(run, tokens), list(ours.parameters()))
    for (name, _), a, r in zip(ref.named_parameters(), g_ours, g_ref):
        if bf16:  # both sides round q/k/v/P to bf16, in different orders
            err, size = (a - r).abs().max().item(), r.abs().max().item()
            assert err <= 0.1 * size + 1e-3, (name, err, size)
        else:
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-3, msg=name)
    losses, ref_losses = _train(run, tokens, precision=ctx), _train(ref, tokens, precision=ctx)
    assert losses[-1] < 0.7 * losses[0], losses
    assert abs(losses[-1] - ref_losses[-1]) < (5e-2 if bf16 else 1e-2) * ref_losses[0], (losses, ref_losses)


@pytest.mark.parametrize("attn", ["fa3", "mate_varlen", "fa3_compiled"])
def test_tiny_lm_trains_like_sdpa(attn):
    _check_trains_like_sdpa(attn)


_CUDA_BWD = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("mate::fmha_bwd", "CUDA")


@pytest.mark.skipif(not _CUDA_BWD, reason="needs a CUDA GPU and a build with the CUDA backward")
@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast"])
@pytest.mark.parametrize("attn", ["fa3", "mate_varlen", "fa3_compiled"])
def test_tiny_lm_trains_on_cuda(attn, precision):
    """The same training on a GPU: fp32 runs the CUDA-core backward, bf16 autocast the
    tensor-core one (head dim 8 padded to the 64-wide tile inside the kernel)."""
    _check_trains_like_sdpa(attn, "cuda", precision == "bf16_autocast")


def test_transformers_backend_trains_like_sdpa():
    transformers = pytest.importorskip("transformers")
    import mate_ops.integrations.transformers  # noqa: F401  registers attn_implementation="mate"

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    ref.config._attn_implementation = "sdpa"
    ours = copy.deepcopy(ref)
    ours.config._attn_implementation = "mate"
    tokens = torch.randint(0, VOCAB, (2, 20))
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0  # left padding in row 1: the mate mask becomes cache_leftpad / seqused

    def loss_of(model):
        labels = tokens.masked_fill(mask == 0, -100)
        return model(input_ids=tokens, attention_mask=mask, labels=labels).loss

    from torch.utils._python_dispatch import TorchDispatchMode

    class MateCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "mate":
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    g_ref = torch.autograd.grad(loss_of(ref), list(ref.parameters()))
    with MateCalls() as calls:
        g_ours = torch.autograd.grad(loss_of(ours), list(ours.parameters()))
    assert "fmha_fwd.default" in calls.ops and "fmha_bwd.default" in calls.ops, calls.ops
    for (name, _), a, r in zip(ref.named_parameters(), g_ours, g_ref):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-3, msg=name)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_of(ours)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
