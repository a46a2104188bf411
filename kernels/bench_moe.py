#!/usr/bin/env python
"""Benchmark the MoE expert kernels (trainlab.kernels.moe).

grouped_expert_ffn (top-k routing; forward, backward, full): trainlab's sorted, padding-free Triton kernel against a
per-expert PyTorch loop (`grouped_expert_ffn_ref` in the input dtype), a dense FFN of equal total width (E*h), a dense
FFN of equal active width (k*h), and, on GPU, ScatterMoE and MegaBlocks' grouped GEMM when they are importable.

chunk_sparse_ffn (BlockFFN inference): on CPU, the union-gathered PyTorch path against the dense FFN of equal total
width for T in {1, 8, 32} over union (active) fractions, threads pinned, medians of interleaved repeats, ratio measured
in one run (`trainlab.kernels.moe.bench_chunk_sparse_cpu`). The scores here are SYNTHETIC masks with a prescribed
union; the real measurement, with the trained BlockFFN and TopK routers' own inputs and scores chunk by chunk, is
`trainlab.moe.measure_inference`, run by `trainlab reproduce moe` (results: nbs/results/moe/metrics.json, keys
`inference*`, and the table in nbs/20_moe_routing.ipynb).
On GPU, the Triton kernel, the PyTorch union path and the dense FFN over T at a fixed union fraction.

GPU:  python kernels/bench_moe.py          bf16 sweeps, speed and peak memory, appended to kernels/results/all.csv (+ plots)
CPU:  python kernels/bench_moe.py --quick  smoke run of the grouped torch providers on tiny sizes, and the chunk-sparse
                                           CPU table; nothing recorded unless --record
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from trainlab.kernels.moe import (
    bench_chunk_sparse_cpu, chunk_sparse_ffn, grouped_expert_ffn, grouped_expert_ffn_ref, route_by_expert)
from trainlab.kernels.utils import (
    SkipCase, append_rows, bench_argparser, bench_row, interpreting, make_mode_fn, plot_results, require_compiled, run_bench)

GROUPED_PROVIDERS = ("torch_loop", "dense_total", "dense_active", "scattermoe", "megablocks", "trainlab")
CHUNK_GPU_PROVIDERS = ("dense_total", "torch_union", "trainlab")
OPS = ("grouped", "chunk")


def make_routing(T, E, k, device, generator):
    "k distinct experts per token (uniform random) and softmax gates."
    ids = torch.rand(T, E, device=device, generator=generator).argsort(1)[:, :k]
    gates = torch.softmax(torch.randn(T, k, device=device, generator=generator), -1)
    return ids, gates


def synthetic_scores(T, E, union_fraction, per_token_fraction=0.2, seed=0):
    """[T, E] nonnegative scores whose union over the T tokens is exactly round(union_fraction * E) experts; each token
    uses min(|union|, round(per_token_fraction * E)) of them (a TLS of 0.8 by default). SYNTHETIC: not a trained router."""
    g = torch.Generator().manual_seed(seed)
    U = max(1, round(union_fraction * E))
    per_tok = max(1, min(U, round(per_token_fraction * E)))
    union = torch.randperm(E, generator=g)[:U]
    pick = union[torch.rand(T, U, generator=g).argsort(1)[:, :per_tok]]
    mask = torch.zeros(T, E, dtype=torch.bool).scatter_(1, pick, True)
    for i, e in enumerate(union.tolist()):  # every union expert is used by some token
        if not mask[:, e].any(): mask[i % T, e] = True
    scores = torch.rand(T, E, generator=g) * mask
    assert int(scores.any(0).sum()) == U
    return scores


def _scattermoe_fwd(x, w_in, w_out, ids, gates):
    try:
        from scattermoe.mlp import MLP
    except Exception as e:  # noqa: BLE001 - any import problem means "not available here"
        raise SkipCase(f"scattermoe not importable ({e})")
    E, h, d = w_in.shape
    m = MLP(input_size=d, hidden_size=h, num_experts=E, top_k=ids.shape[1], activation=torch.nn.SiLU()).to(x.device, x.dtype)
    with torch.no_grad():
        m.experts.weight.copy_(w_in)  # ParallelExperts weight: [E, out, in]
        m.output_experts.weight.copy_(w_out)
    return m, lambda: m(x, gates, ids)


def _megablocks_gmm():
    try:
        from grouped_gemm import ops as gg
        return gg
    except Exception:  # noqa: BLE001
        pass
    try:
        from megablocks import grouped_gemm_util as gu
        if getattr(gu, "grouped_gemm_is_available", lambda: False)(): return gu.ops
    except Exception as e:  # noqa: BLE001
        raise SkipCase(f"megablocks / grouped_gemm not importable ({e})")
    raise SkipCase("megablocks' grouped GEMM is not available")


def _megablocks_fwd(x, w_in, w_out, ids, gates):
    "MegaBlocks' grouped GEMM (mlp_impl='grouped') with our sort-by-expert permutation around it."
    gg = _megablocks_gmm()
    T, d = x.shape
    E, h, _ = w_in.shape
    k = ids.shape[1]
    rt = route_by_expert(ids, E)
    batch_sizes = rt.counts.long().cpu()
    token, pair = rt.token.long(), rt.pair.long()
    def fwd():
        hid = F.silu(gg.gmm(x[token], w_in, batch_sizes, trans_b=True))  # [R, h]
        z = gg.gmm(hid, w_out, batch_sizes, trans_b=True)  # [R, d]
        zp = torch.empty_like(z).index_copy(0, pair, z).view(T, k, d)
        return torch.bmm(gates.to(z.dtype).unsqueeze(1), zp).squeeze(1)
    return fwd


def bench_grouped(args, device, dtype, quick, csv_path):
    on_cuda = device.type == "cuda"
    d, h, E, k = (64, 32, 8, 2) if quick else (1024, 512, 32, 4)
    sizes = [64, 256] if quick else [1024, 4096, 16384]

    def setup(provider, mode, x):
        require_compiled(provider, on_cuda, gpu_providers=("trainlab", "scattermoe", "megablocks"))
        g = torch.Generator(device=device).manual_seed(0)
        T = x
        inp = torch.randn(T, d, device=device, dtype=dtype, generator=g).requires_grad_()
        w_in = (torch.randn(E, h, d, device=device, generator=g) / math.sqrt(d)).to(dtype).requires_grad_()
        w_out = (torch.randn(E, d, h, device=device, generator=g) / math.sqrt(h)).to(dtype).requires_grad_()
        ids, gates = make_routing(T, E, k, device, g)
        gates = gates.to(dtype).requires_grad_()
        if provider in ("dense_total", "dense_active"):
            width = E * h if provider == "dense_total" else k * h
            w1 = (torch.randn(width, d, device=device, generator=g) / math.sqrt(d)).to(dtype).requires_grad_()
            w2 = (torch.randn(d, width, device=device, generator=g) / math.sqrt(width)).to(dtype).requires_grad_()
            return make_mode_fn(mode, lambda: F.silu(inp @ w1.T) @ w2.T, [inp, w1, w2])
        if provider == "torch_loop":
            fwd = lambda: grouped_expert_ffn_ref(inp, w_in, w_out, ids, gates, upcast=False)
        elif provider == "trainlab":
            fwd = lambda: grouped_expert_ffn(inp, w_in, w_out, ids, gates, impl="triton")
        elif provider == "scattermoe":
            m, fwd = _scattermoe_fwd(inp, w_in.detach(), w_out.detach(), ids, gates)
            try: fwd()
            except Exception as e: raise SkipCase(f"scattermoe failed here ({e})")  # noqa: BLE001
            return make_mode_fn(mode, fwd, [inp, gates, m.experts.weight, m.output_experts.weight])
        elif provider == "megablocks":
            fwd = _megablocks_fwd(inp, w_in, w_out, ids, gates)
            try: fwd()
            except Exception as e: raise SkipCase(f"megablocks grouped GEMM failed here ({e})")  # noqa: BLE001
        else:
            raise SkipCase(f"unknown provider {provider!r}")
        return make_mode_fn(mode, fwd, [inp, w_in, w_out, gates])

    return run_bench("grouped_expert_ffn", setup, args.providers or GROUPED_PROVIDERS, args.modes, "T", "tokens", sizes,
                     device=device, extra_config=dict(d=d, h=h, E=E, k=k, dtype=str(dtype).replace("torch.", ""), quick=quick),
                     csv_path=csv_path, overwrite=True if args.overwrite else None)


def bench_chunk_gpu(args, device, dtype, quick, csv_path):
    d, h, E, u = (256, 32, 16, 0.25) if quick else (2048, 128, 64, 0.25)
    sizes = [1, 8, 32, 64]

    def setup(provider, mode, x):
        if mode != "forward": raise SkipCase("chunk_sparse_ffn is an inference kernel: forward only")
        if provider == "trainlab": require_compiled(provider, True, gpu_providers=("trainlab", "scattermoe", "megablocks"))
        g = torch.Generator(device=device).manual_seed(0)
        T = x
        inp = torch.randn(T, d, device=device, dtype=dtype, generator=g)
        w_in = (torch.randn(E, h, d, device=device, generator=g) / math.sqrt(d)).to(dtype)
        w_out = (torch.randn(E, d, h, device=device, generator=g) / math.sqrt(h)).to(dtype)
        scores = synthetic_scores(T, E, u).to(device, dtype)
        if provider == "dense_total":
            w1, w2 = w_in.reshape(E * h, d).contiguous(), w_out.permute(1, 0, 2).reshape(d, E * h).contiguous()
            s = scores.unsqueeze(2)
            fwd = lambda: (F.silu(inp @ w1.T).view(T, E, h) * s).view(T, E * h) @ w2.T
        else:
            impl = "triton" if provider == "trainlab" else "torch"
            fwd = lambda: chunk_sparse_ffn(inp, w_in, w_out, scores, impl=impl)
        return (lambda: _no_grad(fwd)), []

    return run_bench("chunk_sparse_ffn", setup, args.providers or CHUNK_GPU_PROVIDERS, ["forward"], "T", "tokens per chunk",
                     sizes, device=device, extra_config=dict(d=d, h=h, E=E, union_fraction=u, scores="synthetic",
                                                             dtype=str(dtype).replace("torch.", ""), quick=quick),
                     csv_path=csv_path, overwrite=True if args.overwrite else None)


def _no_grad(fn):
    with torch.inference_mode(): return fn()


def bench_chunk_cpu(args, quick, csv_path, log=print):
    "The CPU table: dense vs union-sparse for T in {1, 8, 32} over union fractions (synthetic scores), one run each."
    shapes = [(512, 32, 64), (128, 16, 32)]  # (d, E, h): the research notes' shape, and the tiny trained shape
    fractions = [0.125, 0.25, 0.5, 1.0] if quick else [0.0625, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0]
    repeats = args.repeats or (30 if quick else 200)
    rows, results = [], []
    log(f"chunk_sparse_ffn on CPU: {args.threads} thread(s), {repeats} interleaved repeats, fp32, SYNTHETIC scores "
        f"(union fixed, TLS 0.8 per token); medians in us")
    log(f"{'d':>5} {'E':>3} {'h':>3} {'T':>3} {'union':>6} {'dense_us':>10} {'sparse_us':>10} {'speedup':>8}")
    for d, E, h in shapes:
        g = torch.Generator().manual_seed(0)
        w_in = torch.randn(E, h, d, generator=g) / math.sqrt(d)
        w_out = torch.randn(E, d, h, generator=g) / math.sqrt(h)
        for T in (1, 8, 32):
            x = torch.randn(T, d, generator=g)
            for u in fractions:
                scores = synthetic_scores(T, E, u, seed=T)
                r = bench_chunk_sparse_cpu(x, w_in, w_out, scores, repeats=repeats, threads=args.threads)
                results.append(r)
                log(f"{d:>5} {E:>3} {h:>3} {T:>3} {r['active_fraction']:>6.3f} {r['dense_us']:>10.1f} {r['sparse_us']:>10.1f} "
                    f"{r['speedup']:>7.2f}x")
                cfg = dict(d=d, E=E, h=h, T=T, threads=args.threads, repeats=repeats, scores="synthetic", dtype="float32",
                           torch=torch.__version__, quick=quick)
                name = f"chunk_sparse_ffn_cpu_d{d}_T{T}"
                for prov, key in (("dense_total", "dense"), ("torch_union", "sparse")):
                    q20, q80 = r[f"{key}_us_q20_80"]
                    rows.append(bench_row(name, prov, "forward", "speed", "ms", "union_fraction", "union (active) fraction",
                                          r["active_fraction"], (r[f"{key}_us"] / 1e3, q20 / 1e3, q80 / 1e3), cfg, "cpu"))
                rows.append(bench_row(name, "torch_union", "forward", "speedup", "x", "union_fraction",
                                      "union (active) fraction", r["active_fraction"], (r["speedup"],) * 3, cfg, "cpu"))
    if csv_path is not None and rows:
        append_rows(rows, csv_path, overwrite=True if args.overwrite else None)
        log(f"appended {len(rows)} rows to {csv_path}")
        for name in sorted({r["kernel_name"] for r in rows}):
            for f in plot_results(csv_path, name, "cpu"): log(f"plot {f}")
    return results


def main(argv=None):
    p = bench_argparser(__doc__)
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    p.add_argument("--threads", type=int, default=1, help="torch threads for the CPU chunk-sparse table (pinned)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per CPU chunk-sparse case")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    record = (on_cuda or args.record) and not args.no_record
    csv_path = (args.csv or HERE / "results" / "all.csv") if record else None
    if "grouped" in args.ops: bench_grouped(args, device, dtype, quick, csv_path)
    if "chunk" in args.ops:
        if on_cuda: bench_chunk_gpu(args, device, dtype, quick, csv_path)
        bench_chunk_cpu(args, quick, (args.csv or HERE / "results" / "all.csv") if args.record and not args.no_record else None)


if __name__ == "__main__":
    main()
