"""The Triton paged decode-attention kernel against the torch reference.

Runs natively on CUDA when present; otherwise on CPU through the Triton interpreter, which must be switched
on before icecache's Triton kernels are first loaded (triton reads TRITON_INTERPRET when they are defined).
"""

import os

import torch  # importing torch does not define any Triton kernel, so setting the variable after it is fine

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from icecache.kernels import paged_decode_attention_reference  # noqa: E402
from icecache.kernels.triton_decode import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_triton,
    triton_available,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@st.composite
def decode_cases(draw):
    """Shapes, a seed, a validity pattern and a split size for one decode call."""
    kv_heads = draw(st.integers(1, 3))
    return dict(
        kv_heads=kv_heads,
        group=draw(st.integers(1, 4)),
        slots=draw(st.integers(1, 9)),
        page_size=draw(st.sampled_from([1, 4, 16])),
        head_dim=draw(st.sampled_from([8, 16, 64])),
        seed=draw(st.integers(0, 2**31 - 1)),
        p_valid=draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])),
        dead_pages=draw(st.integers(0, 3)),  # pages fully masked out in every head
        dead_head=draw(st.one_of(st.none(), st.integers(0, kv_heads - 1))),  # a kv head with no valid slot
        pages_per_split=draw(st.one_of(st.none(), st.integers(1, 9))),
    )


def make_inputs(case, dtype=torch.float32):
    g = torch.Generator().manual_seed(case["seed"])
    kv, slots, ps, d = case["kv_heads"], case["slots"], case["page_size"], case["head_dim"]
    q = torch.randn(kv * case["group"], d, generator=g)
    k = torch.randn(kv, slots, ps, d, generator=g)
    v = torch.randn(kv, slots, ps, d, generator=g)
    valid = torch.rand(kv, slots, ps, generator=g) < case["p_valid"]
    valid[:, torch.randperm(slots, generator=g)[: case["dead_pages"]]] = False
    if case["dead_head"] is not None:
        valid[case["dead_head"]] = False
    to = lambda t: t.to(device=DEVICE, dtype=dtype)
    return to(q), to(k), to(v), valid.to(DEVICE)


def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


def check_dead_heads(out, valid, group):
    dead = ~valid.flatten(1).any(1)  # [kv_heads]
    assert torch.all(out[dead.repeat_interleave(group)] == 0)


@settings(max_examples=15)
@given(decode_cases())
def test_matches_reference_fp32(case):
    q, k, v, valid = make_inputs(case)
    out = paged_decode_attention_triton(q, k, v, valid, pages_per_split=case["pages_per_split"])
    ref = paged_decode_attention_reference(q, k, v, valid)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.device == q.device
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert rel_err(out, ref) < 1e-4
    check_dead_heads(out, valid, case["group"])


@settings(max_examples=15)
@given(decode_cases(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_matches_reference_low_precision(case, dtype):
    q, k, v, valid = make_inputs(case, dtype)
    out = paged_decode_attention_triton(q, k, v, valid, pages_per_split=case["pages_per_split"])
    ref = paged_decode_attention_reference(q, k, v, valid)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert rel_err(out, ref) < 2e-2
    check_dead_heads(out, valid, case["group"])


@pytest.mark.parametrize("pages_per_split", [None, 1, 2, 40])
def test_splits_masks_and_dead_head(pages_per_split):
    """Many splits (more than one combine block), fully masked pages and splits, one head with nothing valid."""
    case = dict(kv_heads=2, group=3, slots=40, page_size=1, head_dim=16, seed=3, p_valid=0.5, dead_pages=10,
                dead_head=1, pages_per_split=None)
    q, k, v, valid = make_inputs(case)
    valid[0, :20] = False  # the first splits of head 0 see nothing at all
    out = paged_decode_attention_triton(q, k, v, valid, pages_per_split=pages_per_split)
    ref = paged_decode_attention_reference(q, k, v, valid)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.all(out[3:] == 0) and out[:3].abs().sum() > 0


def test_strided_inputs_custom_scale_and_mixed_dtypes():
    g = torch.Generator().manual_seed(7)
    big_k = torch.randn(2, 6, 4, 32, generator=g).to(DEVICE)
    big_v = torch.randn(2, 6, 4, 32, generator=g).to(DEVICE)
    k, v = big_k[:, ::2, :, :16], big_v[:, 1::2, :, 16:]  # non-contiguous [2, 3, 4, 16]
    q = torch.randn(16, 4, generator=g).to(DEVICE).t()  # [4, 16], transposed strides
    valid = (torch.rand(2, 3, 8, generator=g) > 0.3).to(DEVICE)[:, :, ::2]
    for scale in (0.3, 0.0, 2):
        out = paged_decode_attention_triton(q, k, v, valid, scale=scale, pages_per_split=2)
        torch.testing.assert_close(out, paged_decode_attention_reference(q, k, v, valid, scale), rtol=1e-4, atol=1e-5)
    # fp16 keys/values with an fp32 query: output follows q
    out = paged_decode_attention_triton(q, k.half(), v.half(), valid)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, paged_decode_attention_reference(q, k.half(), v.half(), valid),
                               rtol=1e-4, atol=1e-5)


def test_empty_tier_gives_zeros():
    q = torch.randn(4, 8, device=DEVICE)
    k = torch.zeros(2, 0, 4, 8, device=DEVICE)
    valid = torch.zeros(2, 0, 4, dtype=torch.bool, device=DEVICE)
    out = paged_decode_attention_triton(q, k, k, valid)
    assert out.shape == (4, 8) and torch.all(out == 0)


def _inputs():
    return (torch.randn(4, 8, device=DEVICE), torch.randn(2, 3, 4, 8, device=DEVICE),
            torch.randn(2, 3, 4, 8, device=DEVICE), torch.ones(2, 3, 4, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v, m: (q[0], k, v, m), "q must be"),
    (lambda q, k, v, m: (q, k[0], v[0], m[0]), "k_pages must be"),
    (lambda q, k, v, m: (q, k, v[:, :2], m), "k and v must have the same shape"),
    (lambda q, k, v, m: (q[:, :4], k, v, m), "head_dim differs"),
    (lambda q, k, v, m: (q[:3], k, v, m), "multiple of kv_heads"),
    (lambda q, k, v, m: (q, k[:0], v[:0], m[:0]), "kv_heads = 0"),
    (lambda q, k, v, m: (q, k, v, m[:, :2]), "valid must be"),
    (lambda q, k, v, m: (q, k, v, m.float()), "valid must be a bool"),
    (lambda q, k, v, m: (q.int(), k, v, m), "q must be float32"),
    (lambda q, k, v, m: (q, k.long(), v, m), "k_pages must be float32"),
    (lambda q, k, v, m: (q, k, v, m.numpy() if m.device.type == "cpu" else m.cpu().numpy()), "valid must be a torch"),
])
def test_bad_inputs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_triton(*change(*_inputs()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(pages_per_split=0), "pages_per_split"),
    (dict(pages_per_split=1.5), "pages_per_split"),
    (dict(scale="x"), "scale"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_triton(*_inputs(), **kwargs)


def test_available_and_runtime_dispatch():
    assert triton_available()
    assert triton_available(DEVICE)
    q, k, v, valid = _inputs()
    valid[1] = False
    # the runtime entry point has the AttentionKernel signature (positional scale) and the reference's result
    torch.testing.assert_close(paged_decode_attention(q, k, v, valid, 0.5),
                               paged_decode_attention_reference(q, k, v, valid, 0.5), rtol=1e-4, atol=1e-5)


def test_runtime_decodes_through_the_triton_kernel():
    """The sparse layer's whole data path with the Triton kernel equals the torch reference."""
    import icecache
    from icecache.kernels import paged_decode_attention_triton
    from icecache.runtime import Budget, SparseLayer

    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 140, 16, generator=g), torch.randn(2, 140, 16, generator=g)
    queries = torch.randn(12, 6, 16, generator=g)
    outputs = {}
    for name, kernel in (("reference", paged_decode_attention_reference), ("triton", paged_decode_attention_triton)):
        layer = SparseLayer(icecache.get_index("tree", head_dim=16, page_size=4), Budget(40, 4, 4, 8), 2, 16,
                            torch.float32, torch.device("cpu"), kernel=kernel)
        layer.store(k[:, :128], v[:, :128])
        layer.admit(queries[0].view(2, -1, 16))
        steps = []
        for t in range(12):
            layer.store(k[:, 128 + t : 129 + t], v[:, 128 + t : 129 + t])
            steps.append(layer.decode(queries[t]))
        outputs[name] = torch.stack(steps)
    torch.testing.assert_close(outputs["triton"], outputs["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [None, 256 ** -0.5, 0.2])
def test_one_kv_head_and_head_dim_256(scale):
    # Gemma 3 270M's shape: 4 query heads over 1 KV head, head_dim 256; its own softmax scale
    case = dict(kv_heads=1, group=4, slots=5, page_size=16, head_dim=256, seed=3, p_valid=0.6, dead_pages=1,
                dead_head=None, pages_per_split=2)
    q, k, v, valid = make_inputs(case)
    out = paged_decode_attention_triton(q, k, v, valid, scale=scale, pages_per_split=2)
    ref = paged_decode_attention_reference(q, k, v, valid, scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
