#!/usr/bin/env python
"""Benchmark the MoE expert kernels (trainlab.kernels.moe and trainlab.kernels.moe_chunk).

grouped_expert_ffn (top-k routing; forward, backward, full): trainlab's sorted, padding-free Triton kernel against a
per-expert PyTorch loop (`grouped_expert_ffn_ref` in the input dtype), a dense FFN of equal total width (E*h), a dense
FFN of equal active width (k*h), and, on GPU, ScatterMoE and MegaBlocks' grouped GEMM when they are importable.

chunk_sparse_ffn (BlockFFN inference): on CPU, the dense FFN of equal total width against today's
`chunk_sparse_ffn(impl='torch')` (gathers the union's weights per call) and the prepacked path
`chunk_sparse_ffn_packed(x, pack_experts(w_in, w_out), scores)`, for T in {1, 8, 32} at d512/h128 and d128/h32 (16
experts), 1 thread pinned, all three interleaved in one process (`trainlab.moe.inference.bench_chunk_sparse_cpu` with
`compare_old=True`), medians and 95% CIs of the paired ratios (`trainlab.stats.ci_ratio`). The scores are SYNTHETIC:
3 of 16 experts per token, drawn from a small pool per 8-token segment (chunk locality); the union fraction is reported.
The real measurement, with the trained BlockFFN and TopK routers' own inputs and scores chunk by chunk, is
`trainlab.moe.measure_inference`, run by `trainlab reproduce moe` (results: nbs/results/moe/metrics.json, keys
`inference*`, and the table in nbs/moe/08_results.ipynb).
On GPU, the Triton kernel, the PyTorch union path and the dense FFN over T at a fixed union fraction.

GPU:  python kernels/bench_moe.py          bf16 sweeps, speed and peak memory, appended to kernels/results/all.csv (+ plots)
CPU:  OMP_NUM_THREADS=1 python kernels/bench_moe.py --ops chunk
                                           the chunk-sparse CPU table, written atomically to
                                           kernels/results/chunk_sparse_cpu.csv (--out PATH); --record also appends
                                           long-format rows to all.csv
      python kernels/bench_moe.py --ops chunk --table      print the README table from that CSV
      python kernels/bench_moe.py --variants               time the variants of the packed path
                                           (-> kernels/results/chunk_sparse_variants_cpu.csv)
      python kernels/bench_moe.py --quick  smoke run of the grouped torch providers on tiny sizes and a short
                                           chunk-sparse CPU table; nothing written
"""
import csv
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from trainlab.core import atomic_path, cpu_name, git_sha, now_iso
from trainlab.kernels.moe import grouped_expert_ffn, grouped_expert_ffn_ref, route_by_expert
from trainlab.kernels.moe_chunk import (
    active_runs, chunk_sparse_ffn, chunk_sparse_ffn_packed, pack_experts)
from trainlab.moe.inference import bench_chunk_sparse_cpu
from trainlab.kernels.utils import interpreting, max_abs_err
from benchlib import (
    SkipCase, append_rows, bench_argparser, bench_row, make_mode_fn, require_compiled, run_bench)
from trainlab.stats import ci_ratio

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


# ---------------------------------------------------------------- chunk_sparse_ffn on CPU

CPU_SHAPES = {"d512/h128": (512, 128), "d128/h32": (128, 32)}  # (d, h), 16 experts: a wider layer, the tiny trained one
CPU_E, CPU_T = 16, (1, 8, 32)
SCORES_NOTE = "synthetic: 3 of 16 experts per token, drawn from a pool of 5 per 8-token segment (2 swapped per segment)"
CSV_COLUMNS = ["shape", "d", "h", "E", "T", "union_fraction", "token_active_fraction", "dense_us", "old_us", "packed_us",
               "speedup_old", "speedup_packed", "ci_lo", "ci_hi", "speedup_packed_gmean", "speedup_old_gmean", "old_ci_lo",
               "old_ci_hi", "packed_vs_old", "packed_vs_old_lo", "packed_vs_old_hi", "repeats", "threads", "torch", "dtype",
               "scores", "cpu", "git_sha", "timestamp"]


def local_scores(T, E, per_token=3, pool=5, segment=8, swap=2, seed=0):
    """[T, E] nonnegative scores with chunk locality: each `segment`-token stretch draws every token's `per_token`
    active experts from a pool of `pool`; the next stretch keeps `pool - swap` of them and swaps in `swap` new ones.
    SYNTHETIC: an idealised locality-trained router (TLS = 1 - per_token / E), not a trained one."""
    g = torch.Generator().manual_seed(seed)
    cur = torch.randperm(E, generator=g)[:pool]
    mask = torch.zeros(T, E, dtype=torch.bool)
    for s0 in range(0, T, segment):
        if s0:  # drift: keep pool - swap experts, bring in swap from outside the pool
            keep = cur[torch.randperm(pool, generator=g)[:pool - swap]]
            outside = torch.tensor([e for e in range(E) if e not in set(cur.tolist())])
            cur = torch.cat([keep, outside[torch.randperm(len(outside), generator=g)[:swap]]])
        for t in range(s0, min(s0 + segment, T)):
            mask[t, cur[torch.randperm(pool, generator=g)[:per_token]]] = True
    return (torch.rand(T, E, generator=g) + 0.1) * mask


def cpu_case(d, h, T, seed=0):
    "fp32 weights, a chunk of T tokens and its `local_scores`."
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(CPU_E, h, d, generator=g) / math.sqrt(d)
    w_out = torch.randn(CPU_E, d, h, generator=g) / math.sqrt(h)
    x = torch.randn(T, d, generator=g)
    return x, w_in, w_out, local_scores(T, CPU_E, seed=seed + T)


def bench_chunk_cpu(args, quick, out, record_csv=None, log=print):
    """The CPU table: dense FFN of equal total width vs today's `chunk_sparse_ffn(impl='torch')` vs the packed path
    (`chunk_sparse_ffn_packed`), interleaved in one process, 95% CIs over the repeats; written to `out` atomically."""
    repeats = args.repeats or (20 if quick else 2000)
    rows, long_rows = [], []
    log(f"chunk_sparse_ffn on CPU ({cpu_name()}): {args.threads} thread(s), {repeats} interleaved repeats, fp32, torch "
        f"{torch.__version__}; scores {SCORES_NOTE}; medians in us, speedup = dense median / path median; geo-mean = "
        "geometric mean of the paired per-repeat ratios, with its 95% t interval on the log scale")
    for line in TABLE_HEAD: log(line)
    for shape, (d, h) in CPU_SHAPES.items():
        for T in CPU_T:
            x, w_in, w_out, scores = cpu_case(d, h, T)
            r = bench_chunk_sparse_cpu(x, w_in, w_out, scores, repeats=repeats, threads=args.threads, warmup=20,
                                       compare_old=True)
            t = r["times_us"]
            pvo = ci_ratio(t["old"], t["sparse"])  # paired by repeat: old_i / packed_i
            row = dict(shape=shape, d=d, h=h, E=CPU_E, T=T, union_fraction=r["active_fraction"],
                       token_active_fraction=r["token_active_fraction"], dense_us=r["dense_us"], old_us=r["old_us"],
                       packed_us=r["sparse_us"], speedup_old=r["speedup_old"], speedup_packed=r["speedup"],
                       ci_lo=r["speedup_ci95"][0], ci_hi=r["speedup_ci95"][1], speedup_packed_gmean=r["speedup_gmean"],
                       speedup_old_gmean=r["speedup_old_gmean"], old_ci_lo=r["speedup_old_ci95"][0],
                       old_ci_hi=r["speedup_old_ci95"][1], packed_vs_old=pvo[0], packed_vs_old_lo=pvo[1],
                       packed_vs_old_hi=pvo[2], repeats=repeats, threads=args.threads, torch=torch.__version__,
                       dtype="float32", scores=SCORES_NOTE)
            rows.append(row)
            log(table_line(row))
            cfg = dict(d=d, E=CPU_E, h=h, T=T, threads=args.threads, repeats=repeats, scores="synthetic-local",
                       dtype="float32", torch=torch.__version__, quick=quick)
            name = f"chunk_sparse_ffn_cpu_d{d}_T{T}"
            for prov, key in (("dense_total", "dense"), ("torch_union", "old"), ("torch_packed", "sparse")):
                q20, q80 = r[f"{key}_us_q20_80"]
                long_rows.append(bench_row(name, prov, "forward", "speed", "ms", "union_fraction", "union (active) fraction",
                                           r["active_fraction"], (r[f"{key}_us"] / 1e3, q20 / 1e3, q80 / 1e3), cfg, "cpu"))
    if out is not None:
        meta = dict(cpu=cpu_name(), git_sha=git_sha(), timestamp=now_iso())
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS); w.writeheader()
            for r in rows: w.writerow({**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, **meta})
        log(f"-> {out}")
    if record_csv is not None and long_rows:
        append_rows(long_rows, record_csv, overwrite=True if args.overwrite else None)
        log(f"appended {len(long_rows)} rows to {record_csv}")
    return rows


TABLE_HEAD = ["| shape | T | union | dense us | old us | packed us | old speedup | packed speedup | "
              "packed geo-mean [95% CI] | packed / old geo-mean [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]


def table_line(r):
    "One markdown row of the CPU table, from a CSV row (strings or numbers)."
    f = {k: (float(v) if k not in ("shape", "T", "scores", "torch", "dtype", "cpu", "git_sha", "timestamp") else v)
         for k, v in r.items() if v not in (None, "")}
    ci = lambda a, lo, hi: f"{f[a]:.2f}x [{f[lo]:.2f}, {f[hi]:.2f}]"
    return (f"| {r['shape']} | {r['T']} | {f['union_fraction']:.2f} | {f['dense_us']:.0f} | {f['old_us']:.0f} | "
            f"{f['packed_us']:.0f} | {f['speedup_old']:.2f}x | {f['speedup_packed']:.2f}x | "
            f"{ci('speedup_packed_gmean', 'ci_lo', 'ci_hi')} | {ci('packed_vs_old', 'packed_vs_old_lo', 'packed_vs_old_hi')} |")


def readme_table(path):
    "The markdown table of kernels/README.md, generated from the CSV that `bench_chunk_cpu` wrote."
    with open(path, newline="") as f: rows = list(csv.DictReader(f))
    r0 = rows[0]
    lines = [f"Recorded in `results/{Path(path).name}` ({r0['threads']} thread, {r0['repeats']} interleaved repeats, "
             f"{r0['cpu']}, torch {r0['torch']}, fp32, E = {r0['E']}; {r0['scores']}):", "", *TABLE_HEAD]
    return "\n".join(lines + [table_line(r) for r in rows])


# ---------------------------------------------------------------- variants of the packed path (why it looks as it does)

def _up_down_views(packed):
    E, h = packed.num_experts, packed.hidden
    return packed.w_up.view(E, h, -1), packed.w_down.view(E, h, -1), E, h


def variant_per_expert(x, packed, scores):
    "One expert at a time on views: up matmul, SiLU, score multiply, then mm / addmm down (4 ops per active expert)."
    up, down, E, h = _up_down_views(packed)
    y = None
    for e, on in enumerate(torch.any(scores, 0).tolist()):
        if not on: continue
        a = F.linear(x, up[e]); F.silu(a, inplace=True); a.mul_(scores[:, e:e + 1])
        y = torch.mm(a, down[e]) if y is None else y.addmm_(a, down[e])
    return x.new_zeros(x.shape[0], up.shape[2]) if y is None else y


def variant_buffer(x, packed, scores):
    "Up matmuls on views into one [U, T, h] buffer, one SiLU and one score multiply for all, then one addmm per expert."
    up, down, E, h = _up_down_views(packed)
    idx = torch.any(scores, 0).nonzero().view(-1)
    il = idx.tolist()
    if not il: return x.new_zeros(x.shape[0], up.shape[2])
    hid = x.new_empty(len(il), x.shape[0], h)
    for i, e in enumerate(il): torch.mm(x, up[e].T, out=hid[i])
    F.silu(hid, inplace=True)
    hid.mul_(scores.T.index_select(0, idx).unsqueeze(2))  # gathers scores (activations), not weights
    y = torch.mm(hid[0], down[il[0]])
    for i in range(1, len(il)): y.addmm_(hid[i], down[il[i]])
    return y


def variant_span(x, packed, scores):
    "ONE up and ONE down matmul over the span min(U)..max(U) (views, no copy), but it also reads inactive experts inside it."
    h = packed.hidden
    il = torch.any(scores, 0).nonzero().view(-1).tolist()
    if not il: return x.new_zeros(x.shape[0], packed.w_up.shape[1])
    a0, a1 = il[0], il[-1] + 1
    hid = F.linear(x, packed.w_up[a0 * h:a1 * h]); F.silu(hid, inplace=True)
    hid.view(x.shape[0], a1 - a0, h).mul_(scores[:, a0:a1, None])
    return torch.mm(hid, packed.w_down[a0 * h:a1 * h])


def variant_gather(x, packed, scores):
    "index_select the union's blocks (a per-call weight COPY, what the packed path avoids), then one up and one down matmul."
    up, down, E, h = _up_down_views(packed)
    idx = torch.any(scores, 0).nonzero().view(-1)
    U = idx.numel()
    if U == 0: return x.new_zeros(x.shape[0], up.shape[2])
    hid = F.linear(x, up.index_select(0, idx).view(U * h, -1)); F.silu(hid, inplace=True)
    hid.view(x.shape[0], U, h).mul_(scores.index_select(1, idx).unsqueeze(2))
    return torch.mm(hid, down.index_select(0, idx).view(U * h, -1))


def variant_csr(x, packed, scores):
    """Up as in the kept path, then ONE down matmul without copying weights: the [T, Eh] hidden as a CSR matrix (only the
    union's columns stored) times w_down, so only the union's rows of w_down are read (`torch.sparse.mm`, MKL)."""
    h, T = packed.hidden, x.shape[0]
    act = torch.any(scores, 0)
    idx = act.nonzero().view(-1)
    if idx.numel() == 0: return x.new_zeros(T, packed.w_up.shape[1])
    parts = [F.linear(x, packed.w_up[a * h:b * h]) for a, b in active_runs(act.tolist())]
    hid = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # [T, U*h], activations
    U = idx.numel()
    F.silu(hid, inplace=True)
    hid.view(T, U, h).mul_(scores.index_select(1, idx).unsqueeze(2))
    cols = (idx[:, None] * h + torch.arange(h)).view(-1).repeat(T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        H = torch.sparse_csr_tensor(torch.arange(0, T * U * h + 1, U * h), cols, hid.reshape(-1), size=(T, packed.w_up.shape[0]))
        return torch.sparse.mm(H, packed.w_down)


VARIANTS = {"runs (kept)": lambda x, p, s, *_: chunk_sparse_ffn_packed(x, p, s), "per_expert": variant_per_expert,
            "buffer": variant_buffer, "csr_down": variant_csr, "span (reads inactive)": variant_span,
            "gather (copies weights)": variant_gather}


def bench_variants(args, quick, out, log=print):
    "Every variant, the dense FFN and today's path, interleaved (rotating order), medians and CIs of dense / variant."
    repeats = args.repeats or (20 if quick else 1000)
    old_threads = torch.get_num_threads(); torch.set_num_threads(args.threads)
    rows = []
    try:
        for shape, (d, h) in CPU_SHAPES.items():
            for T in CPU_T:
                x, w_in, w_out, scores = cpu_case(d, h, T)
                # every path reads its own copy of the weights, so none runs on blocks another one just pulled into cache
                packs = {k: pack_experts(w_in, w_out) for k in VARIANTS}
                w1 = w_in.reshape(CPU_E * h, d).clone()
                w2, s3 = w_out.permute(1, 0, 2).reshape(d, CPU_E * h).clone(), scores.unsqueeze(2)
                fns = {"dense": lambda: (F.silu(x @ w1.T).view(T, CPU_E, h) * s3).view(T, CPU_E * h) @ w2.T,
                       "old": lambda: chunk_sparse_ffn(x, w_in, w_out, scores, impl="torch"),
                       **{k: (lambda f=f, p=packs[k]: f(x, p, scores)) for k, f in VARIANTS.items()}}
                names = list(fns)
                with torch.inference_mode():
                    ref = fns["dense"]()
                    for k, f in fns.items(): assert max_abs_err(f(), ref) < 1e-4, k
                    for _ in range(20):
                        for f in fns.values(): f()
                    t, order = {k: [] for k in names}, random.Random(0)
                    for _ in range(repeats):  # a fresh random order each repeat, as in bench_chunk_sparse_cpu
                        for k in order.sample(names, len(names)):
                            t0 = time.perf_counter(); fns[k](); t[k].append((time.perf_counter() - t0) * 1e6)
                union = float(scores.any(0).float().mean())
                for k in names[1:]:
                    gm, lo, hi = ci_ratio(t["dense"], t[k])
                    rows.append(dict(shape=shape, T=T, union_fraction=round(union, 4), variant=k,
                                     us=round(statistics.median(t[k]), 2), dense_us=round(statistics.median(t["dense"]), 2),
                                     speedup=round(statistics.median(t["dense"]) / statistics.median(t[k]), 3),
                                     speedup_gmean=round(gm, 3), ci_lo=round(lo, 3), ci_hi=round(hi, 3), repeats=repeats,
                                     threads=args.threads, torch=torch.__version__))
                log(f"{shape} T={T} union {union:.2f}: dense {statistics.median(t['dense']):.0f} us; " + "; ".join(
                    f"{r['variant']} {r['us']:.0f} us ({r['speedup']:.2f}x [{r['ci_lo']:.2f}, {r['ci_hi']:.2f}])"
                    for r in rows if r["shape"] == shape and r["T"] == T))
    finally:
        torch.set_num_threads(old_threads)
    if out is not None and rows:
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0], "cpu", "timestamp"]); w.writeheader()
            for r in rows: w.writerow({**r, "cpu": cpu_name(), "timestamp": now_iso()})
        log(f"-> {out}")
    return rows


def main(argv=None):
    p = bench_argparser(__doc__)
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    p.add_argument("--threads", type=int, default=1, help="torch threads for the CPU chunk-sparse table (pinned)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per CPU chunk-sparse case")
    p.add_argument("--out", default=str(HERE / "results" / "chunk_sparse_cpu.csv"), help="the CPU chunk-sparse table")
    p.add_argument("--variants", action="store_true",
                   help="time the variants of the packed path instead (-> results/chunk_sparse_variants_cpu.csv)")
    p.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    args = p.parse_args(argv)
    if args.table: return print(readme_table(args.out))
    if args.variants:
        return bench_variants(args, args.quick, None if args.quick else HERE / "results" / "chunk_sparse_variants_cpu.csv")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    record = (on_cuda or args.record) and not args.no_record
    csv_path = (args.csv or HERE / "results" / "all.csv") if record else None
    if "grouped" in args.ops: bench_grouped(args, device, dtype, quick, csv_path)
    if "chunk" in args.ops:
        if on_cuda: bench_chunk_gpu(args, device, dtype, quick, csv_path)
        bench_chunk_cpu(args, args.quick, None if args.quick else args.out,
                        (args.csv or HERE / "results" / "all.csv") if args.record and not args.no_record else None)


if __name__ == "__main__":
    main()
