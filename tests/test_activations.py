"""Activation statistics on real tiny models: padding never counts, token
filters with weights alignment, and the device the statistics live on."""
import pytest
import torch
import transformers as T

import models as M
from otcompress import activations, architectures
from otcompress.fusion import fuse

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def berts():
    anchor, parent = M.bert(seed=1), M.bert(hidden=48, heads=6, inter=96, seed=2)
    return architectures.build_spec(anchor), anchor, parent


@pytest.fixture(scope="module")
def vits():
    anchor, parent = M.vit(seed=1), M.vit(hidden=48, heads=6, inter=96, seed=2)
    return architectures.build_spec(anchor), anchor, parent


def padded_batches(seed=0):
    """The same 6 sentences twice: padded with id 0, and padded with garbage
    (random ids and token types in every padded position, plus 5 extra padded
    columns)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate([10, 7, 4, 9, 2, 6]):
        mask[i, n:] = 0
        ids[i, n:] = 0
    clean = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    junk_ids = torch.cat([ids, torch.randint(0, 60, (6, 5), generator=g)], 1)
    pad = mask == 0
    junk_ids[:, :10][pad] = torch.randint(0, 60, (int(pad.sum()),), generator=g)
    junk_mask = torch.cat([mask, torch.zeros(6, 5, dtype=mask.dtype)], 1)
    junk_types = torch.cat([torch.zeros_like(ids), torch.randint(0, 2, (6, 5), generator=g)], 1)
    junk = {"input_ids": junk_ids, "attention_mask": junk_mask, "token_type_ids": junk_types}
    return clean, junk


def stats(spec, anchor, parent, data, **kw):
    return activations.collect(spec, anchor, [parent], data, need_costs=True, need_norms=True, **kw)


def max_cost_diff(a, b):
    return max((a["costs"][0][tm].cpu() - b["costs"][0][tm].cpu()).abs().max().item() for tm in a["costs"][0])


@pytest.mark.parametrize("max_chunk", [16, 2])
def test_padded_tokens_are_not_samples(berts, max_chunk):
    spec, anchor, parent = berts
    clean, junk = padded_batches()
    a = stats(spec, anchor, parent, clean)
    b = stats(spec, anchor, parent, junk, max_chunk=max_chunk)
    assert a["samples"] == b["samples"] == int(clean["attention_mask"].sum()) == 38
    assert max_cost_diff(a, b) < 1e-5
    for tm, n in a["norms"].items():
        assert abs(n.alpha("scalar") - b["norms"][tm].alpha("scalar")) < 1e-6
        assert torch.allclose(n.alpha("matrix"), b["norms"][tm].alpha("matrix"), atol=1e-6)
    # The check can fail: counting the garbage (mask all ones) moves the costs.
    everything = {**junk, "attention_mask": torch.ones_like(junk["attention_mask"])}
    unmasked = stats(spec, anchor, parent, everything)
    assert unmasked["samples"] == 6 * 15 and max_cost_diff(a, unmasked) > 1e-2


def test_token_filter_with_weights_alignment_and_weighted_residual(vits):
    spec, anchor, parent = vits
    x = M.inputs(anchor, batch=8)
    # Only residual norms are needed: the filter has no token statistics to
    # select from and must not fail (it raised a bare StopIteration).
    filtered = activations.collect(spec, anchor, [parent], x, need_costs=False, need_norms=True,
                                   token_filter="only_cls")
    plain = activations.collect(spec, anchor, [parent], x, need_costs=False, need_norms=True)
    assert filtered["costs"] == [{}] and set(filtered["norms"]) == set(plain["norms"])
    for tm, n in plain["norms"].items():  # residual norms always use every token
        assert n.alpha("scalar") == filtered["norms"][tm].alpha("scalar")
    fused = fuse(anchor, parent, alignment="weights", residual="scalar", token_filter="window_2",
                 data=x, solver="emd")
    out = M.outputs(fused, x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_token_filter_selects_cost_tokens(vits):
    spec, anchor, parent = vits
    x = M.inputs(anchor, batch=8)
    every = stats(spec, anchor, parent, x)
    cls = stats(spec, anchor, parent, x, token_filter="only_cls")
    seq = 1 + (8 // 2) ** 2
    assert every["samples"] == 8 * seq
    assert max_cost_diff(every, cls) > 1e-3  # fewer tokens: other statistics


def test_device_defaults_to_the_anchors(berts):
    spec, anchor, parent = berts
    clean, _ = padded_batches()
    default = stats(spec, anchor, parent, clean)
    explicit = stats(spec, anchor, parent, clean, device=torch.device("cpu"))
    named = stats(spec, anchor, parent, clean, device="cpu")
    assert max_cost_diff(default, explicit) == 0 and max_cost_diff(default, named) == 0
    assert all(c.device.type == "cpu" and c.dtype == torch.float32 for c in default["costs"][0].values())
    assert activations.model_device(anchor) == torch.device("cpu")
    assert activations.model_device(torch.nn.Module()) == torch.device("cpu")


def test_bfloat16_forward_on_cpu_stays_close(berts):
    spec, anchor, parent = berts
    clean, _ = padded_batches()
    a = stats(spec, anchor, parent, clean)
    b = stats(spec, anchor, parent, clean, forward_dtype=torch.bfloat16)
    assert a["samples"] == b["samples"]
    # As fuse's docstring says: ~1e-3 on average (measured 4e-4..1.7e-3 per map), 1e-2 at most (0.011)
    mean = max(float((a["costs"][0][tm] - b["costs"][0][tm]).abs().mean()) for tm in a["costs"][0])
    assert mean < 2.5e-3 and max_cost_diff(a, b) < 0.02


@CUDA
def test_statistics_on_cuda_match_cpu(berts):
    spec, anchor, parent = berts
    clean, junk = padded_batches()
    ref = stats(spec, anchor, parent, clean)
    a_gpu, p_gpu = M.bert(seed=1).cuda(), M.bert(hidden=48, heads=6, inter=96, seed=2).cuda()
    on_gpu = stats(spec, a_gpu, p_gpu, junk)  # CPU batches, CUDA models: statistics on the anchor's
    assert all(c.device.type == "cuda" for c in on_gpu["costs"][0].values())
    assert on_gpu["samples"] == ref["samples"]
    assert max_cost_diff(ref, on_gpu) < 1e-4
    for tm, n in on_gpu["norms"].items():
        assert n.alpha("matrix").device.type == "cuda"
    # Mixed: anchor on CUDA, parent on CPU, statistics on CPU.
    mixed = stats(spec, a_gpu, M.bert(hidden=48, heads=6, inter=96, seed=2), clean, device="cpu")
    assert max_cost_diff(ref, mixed) < 1e-4
    assert all(c.device.type == "cpu" for c in mixed["costs"][0].values())


@CUDA
def test_vit_token_filter_on_cuda(vits):
    spec, anchor, parent = vits
    x = M.inputs(anchor, batch=8)
    ref = stats(spec, anchor, parent, x, token_filter="window_2")
    gpu = stats(spec, M.vit(seed=1).cuda(), M.vit(hidden=48, heads=6, inter=96, seed=2).cuda(), x,
                token_filter="window_2")
    assert max_cost_diff(ref, gpu) < 1e-4


def test_headless_vit_statistics():
    anchor = M.vit(seed=1, cls=T.ViTModel)
    parent = M.vit(hidden=48, heads=6, inter=96, seed=2, cls=T.ViTModel)
    spec = architectures.build_spec(anchor)
    out = stats(spec, anchor, parent, M.inputs(anchor))
    assert out["samples"] == 4 * 17 and all(torch.isfinite(c).all() for c in out["costs"][0].values())


def test_cross_moments_keep_precision_with_large_means_and_a_shared_side():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 5, generator=g) * 0.01 + 1000  # mean / std = 1e5: unshifted float32 sums lose it all
    y = torch.randn(900, 3, generator=g) + 50
    y[:, 1] = 0.3 * x[:, 0] + 0.01 * y[:, 1]
    x2 = torch.randn(900, 4, generator=g)
    direct = torch.corrcoef(torch.cat([x, y], 1).double().T)[:5, 5:]
    direct2 = torch.corrcoef(torch.cat([x2, y], 1).double().T)[:4, 4:]
    alone = activations.CrossMoments()
    side = activations.Moments()  # one y side shared by two pairs, shifted once per batch
    a, b = activations.CrossMoments(y_side=side), activations.CrossMoments(y_side=side)
    for i in range(0, 900, 128):
        alone.update(x[i:i + 128], y[i:i + 128])
        ys = side.shifted(y[i:i + 128])
        a.add(a.x.shifted(x[i:i + 128]), ys)
        b.add(b.x.shifted(x2[i:i + 128]), ys)
    assert torch.allclose(alone.correlation(), direct, atol=1e-5)
    assert torch.allclose(a.correlation(), direct, atol=1e-5)
    assert torch.allclose(b.correlation(), direct2, atol=1e-5)
    assert a.count == b.count == side.count == 900


def test_bfloat16_forward_statistics_are_those_of_its_activations(berts):
    """Under autocast the products must not be rounded to bfloat16 as well: the
    costs equal those computed in float64 from the bfloat16 activations."""
    spec, anchor, parent = berts
    clean, _ = padded_batches()
    mask = clean["attention_mask"]
    got = stats(spec, anchor, parent, clean, forward_dtype=torch.bfloat16)["costs"][0]
    nodes = [n for n in spec.nodes if type(n).__name__ == "Solve" and len(n.parts) == 1]
    probes = [n.parts[0][1] for n in nodes]
    acts = []
    for model in (anchor, parent):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), \
                activations.capture(model, probes) as store:
            model(**clean)
            acts.append({p: activations.token_samples(t, mask, None).double() for p, t in store.items()})
    worst = 0.0
    for node, probe in zip(nodes, probes):
        a, p = acts[0][probe], acts[1][probe]
        rho = torch.corrcoef(torch.cat([p, a], 1).T)[:p.shape[1], p.shape[1]:]
        rho = torch.nan_to_num(rho).clamp(-1, 1)
        want = (1 - rho).clamp_min(0).sqrt()
        worst = max(worst, (got[node.tm].double() - want).abs().max().item())
    assert worst < 1e-4


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_q_k_v_costs_from_their_shared_input_equal_the_direct_ones(vits, monkeypatch, dtype):
    """Q, K and V read one input: with enough tokens their cross-moments are
    derived from that input's (W_p C W_a^T), and the costs are those of the
    direct products of the outputs."""
    spec, anchor, parent = vits
    data = [M.inputs(anchor, batch=40, seed=s) for s in range(3)]  # 120 images x 17 tokens
    derived = stats(spec, anchor, parent, data, forward_dtype=dtype, token_filter="window_2")
    shared = activations._shared_inputs([(anchor, "cpu"), (parent, "cpu")],
                                        {p for n in spec.nodes if type(n).__name__ == "Solve" for _, p in n.parts},
                                        {"pixel_values": data[0]["pixel_values"][:1]}, 120, dtype)
    assert sorted({p.module.rsplit(".", 1)[1] for p in shared}) == ["k_proj", "q_proj", "v_proj"]
    assert len(shared) == 3 * anchor.config.num_hidden_layers
    monkeypatch.setattr(activations, "_shared_inputs", lambda *a, **k: {})
    direct = stats(spec, anchor, parent, data, forward_dtype=dtype, token_filter="window_2")
    # float32: rounding only; bfloat16: the derived costs use the unrounded outputs
    assert max_cost_diff(derived, direct) < (2e-6 if dtype is None else 0.02)
    assert derived["samples"] == direct["samples"]
