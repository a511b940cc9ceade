#!/usr/bin/python3
"""Write tests/golden/ops_misc.json: PyTorch reference values for the kernels
in core/ops_misc.c (gelu, layer norm, softmax, multi-head self-attention and
cross-entropy), each with its inputs, a random upstream gradient g, the forward
output and the gradients of L = sum(y * g).

Regenerate from the repository root with a Python that has torch 1.13:

    /usr/bin/python3 tests/golden/make_ops_misc_golden.py

The seed is fixed, so a rerun on the same torch version writes the same file.
Every tensor is stored as {"shape": [...], "data": [...]} with row-major float32
values written as exact decimal doubles.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops_misc.json")


def pack(t):
    t = t.detach().to(torch.float32).contiguous()
    return {"shape": list(t.shape), "data": [float(v) for v in t.reshape(-1).tolist()]}


def case_gelu():
    x = torch.linspace(-6.0, 6.0, 25) + 0.1 * torch.randn(25)
    x.requires_grad_(True)
    y = F.gelu(x)  # approximate='none', the erf form
    g = torch.randn_like(y)
    (y * g).sum().backward()
    return {"x": pack(x), "g": pack(g), "y": pack(y), "dx": pack(x.grad)}


def case_layernorm():
    rows, d, eps = 4, 12, 1e-6
    x = (3.0 * torch.randn(rows, d) + 5.0).requires_grad_(True)
    ln = torch.nn.LayerNorm(d, eps=eps)
    with torch.no_grad():
        ln.weight.copy_(1.0 + 0.5 * torch.randn(d))
        ln.bias.copy_(0.5 * torch.randn(d))
    y = ln(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    return {"eps": eps, "x": pack(x), "gamma": pack(ln.weight), "beta": pack(ln.bias),
            "g": pack(g), "y": pack(y), "dx": pack(x.grad), "dgamma": pack(ln.weight.grad),
            "dbeta": pack(ln.bias.grad)}


def case_softmax():
    x = 2.0 * torch.randn(3, 7)
    x[1, 2] = 80.0  # exp(80) overflows float32 unless the max is subtracted
    x[2, :] -= 90.0
    x.requires_grad_(True)
    y = torch.softmax(x, dim=-1)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    return {"x": pack(x), "g": pack(g), "y": pack(y), "dx": pack(x.grad)}


def case_mhsa():
    n, t, d, heads = 2, 5, 8, 2
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    with torch.no_grad():
        # The default in_proj_bias and out_proj.bias are zero; make them count.
        mha.in_proj_bias.copy_(0.2 * torch.randn(3 * d))
        mha.out_proj.bias.copy_(0.2 * torch.randn(d))
    x = torch.randn(n, t, d, requires_grad=True)
    y, att = mha(x, x, x, need_weights=True, average_attn_weights=False)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    return {"n": n, "t": t, "d": d, "heads": heads, "x": pack(x),
            "w_qkv": pack(mha.in_proj_weight), "b_qkv": pack(mha.in_proj_bias),
            "w_out": pack(mha.out_proj.weight), "b_out": pack(mha.out_proj.bias),
            "g": pack(g), "y": pack(y), "att": pack(att), "dx": pack(x.grad),
            "dw_qkv": pack(mha.in_proj_weight.grad), "db_qkv": pack(mha.in_proj_bias.grad),
            "dw_out": pack(mha.out_proj.weight.grad), "db_out": pack(mha.out_proj.bias.grad)}


def case_cross_entropy():
    n, k = 5, 6
    logits = (3.0 * torch.randn(n, k)).requires_grad_(True)
    with torch.no_grad():
        logits[3, 1] += 60.0  # a confident row: log-sum-exp must not overflow
    labels = torch.randint(0, k, (n,), dtype=torch.int64)
    labels[3] = 4  # the confident row is wrong, so its loss is about 60
    loss = F.cross_entropy(logits, labels)  # mean reduction
    loss.backward()
    return {"logits": pack(logits), "labels": [int(v) for v in labels.tolist()],
            "loss": float(loss.item()), "dlogits": pack(logits.grad)}


def main():
    torch.manual_seed(20240611)
    torch.set_num_threads(1)
    cases = {
        "torch_version": torch.__version__,
        "gelu": case_gelu(),
        "layernorm": case_layernorm(),
        "softmax": case_softmax(),
        "mhsa": case_mhsa(),
        "cross_entropy": case_cross_entropy(),
    }
    assert math.isfinite(cases["cross_entropy"]["loss"])
    with open(OUT, "w") as f:
        json.dump(cases, f, separators=(",", ":"))
        f.write("\n")
    print("wrote %s (%d bytes)" % (OUT, os.path.getsize(OUT)))


if __name__ == "__main__":
    main()
