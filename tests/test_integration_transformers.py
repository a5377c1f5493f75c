"""The transformers backend (mate_ops.integrations.transformers): attn_implementation="mate".

Tiny random-weight models of three families, compared with transformers' own "sdpa" /
"eager" implementations on the same weights:
- Llama with GQA (4 query heads, 2 kv heads);
- Gemma-2 with a sliding window (6) on alternate layers and attention-logit softcap;
- gpt-oss with learnable attention sinks (s_aux), a sliding window and GQA.
Inputs have left or right padding; generation runs with dynamic and static caches (the
sliding-window layers then use transformers' sliding caches, rolled once the window is full);
torch.compile(fullgraph=True) must not break the graph nor recompile more than the reference.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mate_ops.integrations.transformers as mt  # noqa: E402  registers "mate"
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, S = 128, 20
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            initializer_range=0.2)  # larger than the default 0.02: peaked attention, so masks matter


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)), "sdpa"


GEMMA2 = dict(sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=30.0)


def _gemma2():
    cfg = transformers.Gemma2Config(**TINY, **GEMMA2)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    return transformers.Gemma2ForCausalLM(cfg), "eager"  # sdpa rejects softcap


def _gpt_oss():
    cfg = transformers.GptOssConfig(**{**TINY, "intermediate_size": 64}, sliding_window=6, num_local_experts=4,
                                    num_experts_per_tok=2)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)  # initialised to ~0 otherwise
    return model, "eager"  # sdpa has no sinks


FAMILIES = {"llama": _llama, "gemma2": _gemma2, "gpt_oss": _gpt_oss}
_models = {}


def model_for(family):
    """(model in eval mode, reference attn_implementation); built once per family."""
    if family not in _models:
        torch.manual_seed(1)
        model, ref = FAMILIES[family]()
        _models[family] = (model.eval(), ref)
    return _models[family]


def padded_batch(padding, B=3, seqlen=S):
    ids = torch.randint(0, VOCAB, (B, seqlen))
    mask = torch.ones(B, seqlen, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
        mask[2:, :9] = 0
    elif padding == "right":
        mask[1, seqlen - 5:] = 0
        mask[2:, 6:] = 0
    return ids, mask


def logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_reference(family, padding):
    model, ref = model_for(family)
    ids, mask = padded_batch(padding)
    want, got = logits(model, ref, ids, mask), logits(model, "mate", ids, mask)
    real = mask.bool()
    err = (want - got).abs()[real].max().item()
    assert err < 2e-5, f"{family} {padding}: max |mate - {ref}| = {err}"
    # left padding must matter, else this test could not fail (right padding sits after every
    # real token, so a causal model never sees it: there the risk is the bottom-right alignment,
    # which the comparison itself checks)
    if padding == "left":
        ignored = logits(model, ref, ids, torch.ones_like(mask))
        assert (ignored - want).abs()[real].max() > 1e-2


def test_window_and_softcap_matter():
    """Gemma-2's window and softcap change the reference logits, so matching them checks both."""
    model, ref = model_for("gemma2")
    ids, mask = padded_batch("left")
    want = logits(model, ref, ids, mask)
    for change in (dict(sliding_window=4096), dict(attn_logit_softcapping=None)):
        cfg = transformers.Gemma2Config(**{**TINY, **GEMMA2, **change})
        other = transformers.Gemma2ForCausalLM(cfg).eval()
        other.load_state_dict(model.state_dict())
        assert (logits(other, ref, ids, mask) - want).abs()[mask.bool()].max() > 1e-3, change


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_greedy_identical(family, cache):
    model, ref = model_for(family)
    ids, mask = padded_batch("left")
    runs = {}
    for impl in (ref, "mate"):
        model.set_attn_implementation(impl)
        runs[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                    cache_implementation=cache, output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=0)
    assert torch.equal(runs[ref].sequences, runs["mate"].sequences)
    err = max((a - b).abs().max().item() for a, b in zip(runs[ref].logits, runs["mate"].logits))
    assert err < 2e-5, err
    assert runs["mate"].sequences.shape[1] == S + 12  # S + 12 > window: the sliding caches rolled


def _compiled_runs(model, impl, shapes):
    """Logits of torch.compile(model, fullgraph=True) on each (B, S, padded) and its frame count."""
    torch._dynamo.reset()
    model.set_attn_implementation(impl)
    cnt = CompileCounterWithBackend("aot_eager")  # exercises the fake kernels and functionalization
    compiled = torch.compile(model, backend=cnt, fullgraph=True)  # fullgraph: a graph break raises
    outs = []
    for B, seqlen, padded in shapes:
        ids, mask = padded_batch("left" if padded else "none", B=B, seqlen=seqlen)
        with torch.no_grad():
            outs.append((compiled(input_ids=ids, attention_mask=mask if padded else None).logits, mask))
    return outs, cnt.frame_count


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_compile_fullgraph_no_extra_recompiles(family):
    model, ref = model_for(family)
    # static shapes, then dynamic ones; then without a mask (llama only, to keep the suite quick)
    shapes = [(3, 12, True), (5, 16, True), (4, 10, False)][:3 if family == "llama" else 2]
    torch.manual_seed(2)
    ref_outs, ref_frames = _compiled_runs(model, ref, shapes)
    torch.manual_seed(2)
    outs, frames = _compiled_runs(model, "mate", shapes)
    assert frames <= ref_frames, (frames, ref_frames)
    for (o, mask), (r, _) in zip(outs, ref_outs):
        assert (o - r).abs()[mask.bool()].max() < 2e-5


def test_compile_static_cache_decode_steps():
    """A compiled decode step on a StaticCache: one graph for every position, same tokens as eager."""
    model, _ = model_for("llama")
    model.set_attn_implementation("mate")
    ids, mask = padded_batch("left", B=2, seqlen=10)

    def decode(step_fn, steps=6):
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            tok, m, pos = out.logits[:, -1:].argmax(-1), mask, mask.sum(1, keepdim=True) - 1
            toks = [tok]
            for _ in range(steps):
                m, pos = torch.cat([m, torch.ones_like(tok)], 1), pos + 1
                logits_ = step_fn(input_ids=tok, attention_mask=m, cache=cache, position_ids=pos,
                                  use_cache=True).logits
                tok = logits_[:, -1:].argmax(-1)
                toks.append(tok)
        return torch.cat(toks, 1)

    eager = decode(model)
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    assert torch.equal(decode(compiled), eager)
    assert cnt.frame_count <= 2, cnt.frame_count  # static shapes once, then dynamic (mask length grows)


def test_torch_export_dynamic_batch_and_length():
    """torch.export of a padded forward: the op stays one node, batch and length stay dynamic."""
    model, _ = model_for("gemma2")
    model.set_attn_implementation("mate")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    dims = {0: torch.export.Dim("batch", min=2), 1: torch.export.Dim("length", min=2)}
    exported = torch.export.export(Logits(), padded_batch("left", B=3, seqlen=12), dynamic_shapes=(dims, dims))
    assert sum(n.target is torch.ops.mate.fmha_fwd.default for n in exported.graph.nodes) == 2  # one per layer
    for shape in [(4, 9, "left"), (3, 15, "right")]:
        ids, mask = padded_batch(shape[2], B=shape[0], seqlen=shape[1])
        with torch.no_grad():
            got = exported.module()(ids, mask)
        want = logits(model, "eager", ids, mask)
        assert (got - want).abs()[mask.bool()].max() < 2e-5


def test_mask_function_lengths():
    """The (3, B, 1, 1) lengths: left pad, key end, real query rows; None when nothing is padded."""
    assert mt.mate_mask(2, 5, 5, attention_mask=None) is None
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    got = mt.mate_mask(2, 5, 5, attention_mask=pad).view(3, 2)
    assert got.dtype == torch.int32 and got.tolist() == [[2, 0], [5, 3], [5, 3]]
    # static cache, decode step at position 5 of a 8-slot cache: slots 6, 7 are not written yet
    dec = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = mt.mate_mask(2, 1, 8, q_offset=torch.tensor(5), attention_mask=dec).view(3, 2)
    assert got.tolist() == [[1, 0], [6, 6], [1, 1]]
    # sliding cache holding absolute positions [3, 8) for a query at 7
    got = mt.mate_mask(2, 1, 5, q_offset=7, kv_offset=3, attention_mask=torch.ones(2, 8, dtype=torch.bool))
    assert got.view(3, 2).tolist() == [[0, 0], [5, 5], [1, 1]]


def test_bf16_logits_within_sdpa_error():
    """bf16 weights: our error against the fp32 logits is at most about SDPA's own."""
    model, _ = model_for("llama")
    ids, mask = padded_batch("left")
    exact = logits(model, "sdpa", ids, mask)
    low = transformers.LlamaForCausalLM(model.config).eval()
    low.load_state_dict(model.state_dict())
    low.to(torch.bfloat16)
    real = mask.bool()
    err_sdpa = (logits(low, "sdpa", ids, mask).float() - exact).abs()[real].max().item()
    err_mate = (logits(low, "mate", ids, mask).float() - exact).abs()[real].max().item()
    assert 0 < err_sdpa and err_mate <= 2 * err_sdpa + 1e-2, (err_mate, err_sdpa)


def test_unsupported_patterns_raise():
    """Packed sequences (position_ids restarting, no mask) would need a materialized mask."""
    model, _ = model_for("llama")
    model.set_attn_implementation("mate")
    ids = torch.randint(0, VOCAB, (1, 12))
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, position_ids=packed, use_cache=False)
    with pytest.raises(NotImplementedError, match="mask overlays"):
        mt.mate_mask(1, 4, 4, attention_mask=None, use_vmap=True)


def test_bad_input():
    model, _ = model_for("llama")
    model.set_attn_implementation("mate")
    ids, mask = padded_batch("none")
    hole = mask.clone()
    hole[0, 5] = 0
    with pytest.raises(ValueError, match="contiguous"):
        model(input_ids=ids, attention_mask=hole)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match=r"\(3, B, 1, 1\) int32"):
        mt.mate_attention_forward(attn, q, k, v, torch.zeros(1, 1, 3, 3))
    attn.train()
    try:
        with pytest.raises(NotImplementedError, match="dropout"):
            mt.mate_attention_forward(attn, q, k, v, None, dropout=0.1)
    finally:
        attn.eval()


def test_imported_on_demand_only():
    """import mate_ops loads neither transformers nor the integration modules."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    code = textwrap.dedent("""
        import sys, mate_ops
        bad = [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")
               or m.startswith("mate_ops.integrations") or m == "mate_ops.distributed"]
        assert not bad, bad
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
