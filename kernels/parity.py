#!/usr/bin/env python
"""Interpreter parity of every Triton kernel against its PyTorch reference, on CPU, in fp32.

For each kernel page's ops (rmsnorm, cross_entropy, linear_cross_entropy, flash_attention causal and with document
masks, grouped_expert_ffn, chunk_sparse_ffn, generic_labels, kl_div) and 3-4 small sizes, this runs `impl="triton"`
under the Triton interpreter and the op's `<op>_ref` on the same fp32 inputs, and records the max abs error of the
forward output and of each input gradient (where the Triton path has a backward), next to the fp32 tolerance the op's
test file states (`TOL[torch.float32]` in tests/test_kernels_*.py). The tests allow `atol + rtol * |ref|` per element,
so `err_over_tol` (max over elements of `|out - ref| / (atol + rtol |ref|)`) is what they check: <= 1 passes. Large
summed gradients (rmsnorm's weight gradient, for one) may exceed `atol` alone and still pass. It also records both fp32 results' error against the
reference run in fp64 (`err_vs_fp64` for Triton, `ref_err_vs_fp64` for PyTorch), which shows how much of the
difference is ordinary fp32 rounding.

These are correctness numbers, not speed: the interpreter runs the kernels through NumPy. GPU timings come from the
bench_*.py scripts run on a GPU.

    OMP_NUM_THREADS=1 python kernels/parity.py          # about 1-2 minutes on one core -> kernels/results/parity_cpu.csv
    OMP_NUM_THREADS=1 python kernels/parity.py --csv /tmp/p.csv --ops rmsnorm kl_div
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or trainlab is imported: kernels defined now are interpreted

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

import triton

from trainlab.core import atomic_path, git_sha, now_iso
from trainlab.kernels import (chunk_sparse_ffn, chunk_sparse_ffn_ref, cross_entropy, cross_entropy_ref, flash_attention,
                              flash_attention_ref, generic_labels, generic_labels_ref, grouped_expert_ffn,
                              grouped_expert_ffn_ref, kl_div, kl_div_ref, linear_cross_entropy, linear_cross_entropy_ref,
                              rmsnorm, rmsnorm_ref)
from trainlab.kernels.utils import interpreting, max_abs_err

COLUMNS = ("kernel", "op", "quantity", "size", "numel", "config", "dtype", "max_abs_err", "tol_atol", "tol_rtol",
           "ref_max_abs", "err_over_tol", "err_vs_fp64", "ref_err_vs_fp64", "torch", "triton", "git_sha", "timestamp")

# fp32 tolerances stated in each op's test file (TOL[torch.float32]); generic_labels must match exactly
TOL32 = {
    "rmsnorm": (1e-5, 1e-5),               # tests/test_kernels_rmsnorm.py
    "cross_entropy": (1e-5, 1e-5),         # tests/test_kernels_cross_entropy.py
    "linear_cross_entropy": (1e-5, 1e-5),  # tests/test_kernels_cross_entropy.py
    "flash_attention": (2e-5, 2e-5),       # tests/test_kernels_attention.py
    "grouped_expert_ffn": (5e-5, 5e-5),    # tests/test_kernels_moe.py
    "chunk_sparse_ffn": (5e-5, 5e-5),      # tests/test_kernels_moe.py
    "generic_labels": (0.0, 0.0),          # tests/test_kernels_unlearning.py: torch.equal
    "kl_div": (2e-5, 1e-5),                # tests/test_kernels_unlearning.py
}


def gen(seed): return torch.Generator().manual_seed(seed)
def randn(*shape, seed=0, scale=1.0): return scale * torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def run(f, inputs, wrt, dy):
    "Output of `f(*inputs)` and the gradients of `<y, dy>` w.r.t. `inputs[i]` for i in `wrt` (None: no backward)."
    inputs = [t.detach().requires_grad_(i in (wrt or ())) if t.is_floating_point() else t for i, t in enumerate(inputs)]
    if not wrt:
        with torch.no_grad(): return [f(*inputs)]
    y = f(*inputs)
    return [y, *torch.autograd.grad(y, [inputs[i] for i in wrt], dy.to(y.dtype))]


def err_over_tol(out, ref, atol, rtol):
    "max |out - ref| / (atol + rtol |ref|) over the elements: torch.testing.assert_close passes iff this is <= 1."
    out, ref = out.detach().double(), ref.detach().double()
    d = (out - ref).abs()
    if d.numel() == 0 or not bool(d.any()): return 0.0
    return float((d / (atol + rtol * ref.abs())).max())


def measure(kernel, op, names, kernel_fn, ref_fn, inputs64, wrt, size, numel, config, out_dtype_exact=False):
    "Rows for one case: Triton fp32 vs reference fp32 (and both vs the reference in fp64)."
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    # upstream gradient, fixed per case: a random tensor of the output's shape (scalar outputs get 0.7)
    y_shape = ref_fn(*inputs64).shape
    dy = randn(*y_shape, seed=99) if len(y_shape) else torch.tensor(0.7, dtype=torch.float64)
    out = run(kernel_fn, inputs32, wrt, dy)
    ref = run(ref_fn, inputs32, wrt, dy)
    ref64 = run(ref_fn, inputs64, wrt, dy)
    atol, rtol = TOL32[op]
    rows = []
    for name, o, r, r64 in zip(names, out, ref, ref64):
        assert o.shape == r.shape and o.dtype == r.dtype, (kernel, name, o.shape, r.shape, o.dtype, r.dtype)
        if out_dtype_exact:  # integer labels: the error is the number of positions that differ, and must be 0
            err, e64, re64 = (float((o != r).sum()), float((o != r64).sum()), float((r != r64).sum()))
            ratio, ref_max = (0.0 if err == 0 else math.inf), float("nan")
        else:
            err, e64, re64 = max_abs_err(o, r), max_abs_err(o, r64), max_abs_err(r, r64)
            ratio, ref_max = err_over_tol(o, r, atol, rtol), float(r.detach().abs().max())
        rows.append(dict(kernel=kernel, op=op, quantity=name, size=size, numel=numel, config=config, dtype="float32",
                         max_abs_err=f"{err:.4g}", tol_atol=atol, tol_rtol=rtol, ref_max_abs=f"{ref_max:.4g}",
                         err_over_tol=f"{ratio:.4g}", err_vs_fp64=f"{e64:.4g}", ref_err_vs_fp64=f"{re64:.4g}"))
    return rows


# ---------------------------------------------------------------- one function per op: a list of rows

def p_rmsnorm():
    rows = []
    for i, (M, N) in enumerate([(8, 128), (64, 1000), (256, 4096)]):
        x, w = randn(M, N, seed=i), 1 + 0.5 * randn(N, seed=10 + i)
        rows += measure("rmsnorm", "rmsnorm", ("forward", "grad_x", "grad_weight"),
                        lambda a, b: rmsnorm(a, b, impl="triton"), rmsnorm_ref, [x, w], (0, 1),
                        f"{M}x{N}", M * N, "eps=1e-6")
    return rows


def _targets(shape, V, seed, p_ignore=0.3):
    t = torch.randint(0, V, shape, generator=gen(seed))
    t[torch.rand(shape, generator=gen(seed + 1)) < p_ignore] = -100
    return t


def p_cross_entropy():
    rows = []
    for i, (N, V) in enumerate([(16, 129), (64, 1000), (128, 8192), (32, 32000)]):
        x, t = randn(N, V, seed=i, scale=2.0), _targets((N,), V, seed=20 + i)
        rows += measure("cross_entropy", "cross_entropy", ("forward", "grad_logits"),
                        lambda a, tt: cross_entropy(a, tt, reduction="none", impl="triton"),
                        lambda a, tt: cross_entropy_ref(a, tt, reduction="none"), [x, t], (0,),
                        f"{N}x{V}", N * V, "reduction=none, 30% ignored")
    return rows


def p_linear_cross_entropy():
    rows = []
    for i, (N, H, V) in enumerate([(15, 16, 100), (64, 64, 1000), (128, 128, 4096)]):
        h, w, t = randn(N, H, seed=i), randn(V, H, seed=30 + i, scale=0.5), _targets((N,), V, seed=40 + i)
        rows += measure("linear_cross_entropy", "linear_cross_entropy", ("forward", "grad_hidden", "grad_weight"),
                        lambda a, b, tt: linear_cross_entropy(a, b, tt, reduction="none", impl="triton"),
                        lambda a, b, tt: linear_cross_entropy_ref(a, b, tt, reduction="none"), [h, w, t], (0, 1),
                        f"N{N} H{H} V{V}", N * V, "reduction=none, 30% ignored, default chunk")
    return rows


def _docs(B, L, n_docs, seed):
    "doc_ids [B, L]: each row cut into n_docs contiguous documents at random boundaries."
    cuts = torch.stack([torch.randperm(L - 1, generator=gen(seed + b))[:n_docs - 1] + 1 for b in range(B)])
    return (torch.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1)


def p_flash_attention():
    rows = []
    for docs in (False, True):
        kernel = "flash_attention_docs" if docs else "flash_attention_causal"
        for i, (B, H, L, D) in enumerate([(1, 2, 64, 32), (1, 2, 128, 64), (2, 2, 256, 64)]):
            q, k, v = (randn(B, H, L, D, seed=50 + 3 * i + j) for j in range(3))
            doc_ids = _docs(B, L, 4, seed=60 + i) if docs else None
            rows += measure(kernel, "flash_attention", ("forward", "grad_q", "grad_k", "grad_v"),
                            lambda a, b, c: flash_attention(a, b, c, True, doc_ids, impl="triton"),
                            lambda a, b, c: flash_attention_ref(a, b, c, True, doc_ids), [q, k, v], (0, 1, 2),
                            f"B{B} H{H} L{L} D{D}", B * H * L * D, "causal" + (", 4 documents per row" if docs else ""))
    return rows


def p_grouped_expert_ffn():
    rows = []
    for i, (T, d, h, E, k) in enumerate([(37, 45, 70, 6, 2), (64, 128, 256, 8, 2), (256, 256, 512, 16, 4)]):
        x = randn(T, d, seed=i)
        w_in, w_out = randn(E, h, d, seed=70 + i) / math.sqrt(d), randn(E, d, h, seed=80 + i) / math.sqrt(h)
        ids = torch.rand(T, E, generator=gen(90 + i)).argsort(1)[:, :k]
        gates = torch.rand(T, k, generator=gen(100 + i), dtype=torch.float64) + 0.1
        rows += measure("grouped_expert_ffn", "grouped_expert_ffn",
                        ("forward", "grad_x", "grad_w_in", "grad_w_out", "grad_gates"),
                        lambda *a: grouped_expert_ffn(*a, impl="triton"), grouped_expert_ffn_ref,
                        [x, w_in, w_out, ids, gates], (0, 1, 2, 4),
                        f"T{T} d{d} h{h} E{E} k{k}", T * d, f"top-{k} of {E}")
    return rows


def p_chunk_sparse_ffn():
    "Forward only: the Triton kernels are the sparse inference pass; gradients are the dense PyTorch formula."
    rows = []
    for i, (T, d, h, E, n_union) in enumerate([(1, 128, 32, 16, 3), (8, 128, 32, 16, 5), (32, 512, 128, 16, 8)]):
        x = randn(T, d, seed=i)
        w_in, w_out = randn(E, h, d, seed=110 + i) / math.sqrt(d), randn(E, d, h, seed=120 + i) / math.sqrt(h)
        union = torch.randperm(E, generator=gen(130 + i))[:n_union]
        scores = torch.zeros(T, E, dtype=torch.float64)
        pick = union[torch.randint(0, n_union, (T, 3), generator=gen(140 + i))]
        scores.scatter_(1, pick, torch.rand(T, 3, generator=gen(150 + i), dtype=torch.float64) + 0.1)
        scores[0, union] = scores[0, union].clamp_min(0.05)  # the union is exactly n_union experts
        rows += measure("chunk_sparse_ffn", "chunk_sparse_ffn", ("forward",),
                        lambda *a: chunk_sparse_ffn(*a, impl="triton"), chunk_sparse_ffn_ref,
                        [x, w_in, w_out, scores], None, f"T{T} d{d} h{h} E{E}", T * d,
                        f"union {n_union} of {E} experts")
    return rows


def p_generic_labels():
    "Integer labels, no gradient: the error is the number of labels that differ (the test requires none)."
    rows = []
    for i, (N, V) in enumerate([(64, 7), (16, 1000), (64, 32000)]):
        b, r = randn(N, V, seed=i, scale=2.0), randn(N, V, seed=160 + i, scale=2.0)
        rows += measure("generic_labels", "generic_labels", ("labels_differing",),
                        lambda a, c: generic_labels(a, c, 1.0, impl="triton"),
                        lambda a, c: generic_labels_ref(a, c, 1.0), [b, r], None, f"{N}x{V}", N * V, "alpha=1",
                        out_dtype_exact=True)
    return rows


def p_kl_div():
    rows = []
    for i, (N, V) in enumerate([(64, 7), (16, 1000), (64, 8192), (16, 32000)]):
        p, q = randn(N, V, seed=i, scale=2.0), randn(N, V, seed=170 + i, scale=2.0)
        rows += measure("kl_div", "kl_div", ("forward", "grad_p", "grad_q"),
                        lambda a, c: kl_div(a, c, "none", impl="triton"), lambda a, c: kl_div_ref(a, c, "none"),
                        [p, q], (0, 1), f"{N}x{V}", N * V, "reduction=none")
    return rows


OPS = {"rmsnorm": p_rmsnorm, "cross_entropy": p_cross_entropy, "linear_cross_entropy": p_linear_cross_entropy,
       "flash_attention": p_flash_attention, "grouped_expert_ffn": p_grouped_expert_ffn,
       "chunk_sparse_ffn": p_chunk_sparse_ffn, "generic_labels": p_generic_labels, "kl_div": p_kl_div}


def write_csv(rows, path):
    "Write `rows` to `path` atomically (a temporary file next to it, then os.replace)."
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return Path(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS), help="subset of ops (default: all)")
    p.add_argument("--csv", default=str(HERE / "results" / "parity_cpu.csv"), help="output CSV (rewritten)")
    args = p.parse_args(argv)
    assert interpreting(), "the kernels must be defined under TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    meta = dict(torch=torch.__version__, triton=triton.__version__, git_sha=git_sha() or "", timestamp=now_iso())
    rows, worst = [], []
    for name in args.ops:
        t0 = time.perf_counter()
        new = [r | meta for r in OPS[name]()]
        rows += new
        errs = [float(r["max_abs_err"]) for r in new]
        over = [r for r in new if not float(r["err_over_tol"]) <= 1]
        worst += over
        print(f"{name:<22} {len(new):3d} rows  max abs err {min(errs):.2g} .. {max(errs):.2g}  "
              f"(atol {new[0]['tol_atol']:g}, rtol {new[0]['tol_rtol']:g}; worst err/tol "
              f"{max(float(r['err_over_tol']) for r in new):.2g})  {'OVER TOLERANCE: ' + str(len(over)) if over else 'ok'}  "
              f"{time.perf_counter() - t0:.1f} s")
    print(f"wrote {len(rows)} rows to {write_csv(rows, args.csv)}")
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
