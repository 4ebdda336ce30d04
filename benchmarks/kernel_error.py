"""Triton kernel vs a float64 torch reference on the CPU (Triton interpreter): max abs / rel error per dtype.

    .venv/bin/python benchmarks/kernel_error.py
"""
import os; os.environ["TRITON_INTERPRET"] = "1"
import torch
from icecache.kernels import paged_decode_attention_reference, paged_decode_attention_triton
g = torch.Generator().manual_seed(0)
kv, slots, ps, d, qh = 2, 6, 16, 64, 6
k = torch.randn(kv, slots, ps, d, generator=g); v = torch.randn(kv, slots, ps, d, generator=g)
q = torch.randn(qh, d, generator=g); valid = torch.rand(kv, slots, ps, generator=g) > 0.2
ref = paged_decode_attention_reference(q.double(), k.double(), v.double(), valid)
for dt in (torch.float32, torch.float16, torch.bfloat16):
    out = paged_decode_attention_triton(q.to(dt), k.to(dt), v.to(dt), valid).double()
    err = (out - ref).abs().max().item(); rel = err / ref.abs().max().item()
    print(dt, f"max abs {err:.1e}  rel {rel:.1e}")
