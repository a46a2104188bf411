#!/usr/bin/env python
"""Benchmark RMSNorm: torch eager (`rmsnorm_ref`), torch.compile, Liger-Kernel (if installed) and trainlab's Triton kernel.

GPU:  python kernels/bench_rmsnorm.py          bf16, hidden size 1024..16384 at 4096 rows, forward/backward/full,
                                               speed and peak memory, appended to kernels/results/all.csv (+ plots)
CPU:  python kernels/bench_rmsnorm.py --quick  smoke run of the torch providers on tiny sizes; nothing recorded
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from trainlab.kernels import rmsnorm, rmsnorm_ref
from trainlab.kernels.utils import interpreting
from benchlib import (
    SkipCase, allow_retained_graph_backward, bench_argparser, make_mode_fn, require_compiled, run_bench)

PROVIDERS = ("torch", "torch_compile", "liger", "trainlab")
EPS = 1e-6



def main(argv=None):
    args = bench_argparser(__doc__).parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    M, sizes = (256, [512, 1000]) if quick else (4096, [1024, 2048, 4096, 8192, 16384])
    compiled = {}  # built on first use: importing torch.compile's machinery takes seconds

    def compiled_ref(*a):
        if not compiled:
            allow_retained_graph_backward()
            compiled["fn"] = torch.compile(rmsnorm_ref)
        return compiled["fn"](*a)

    def setup(provider, mode, x):
        require_compiled(provider, on_cuda)
        g = torch.Generator(device=device).manual_seed(0)
        inp = torch.randn(M, x, device=device, dtype=dtype, generator=g).requires_grad_()
        if provider == "liger":
            try:
                from liger_kernel.transformers.rms_norm import LigerRMSNorm
            except ImportError as e:
                raise SkipCase(f"liger-kernel not importable ({e})")
            m = LigerRMSNorm(x, eps=EPS).to(device, dtype)
            return make_mode_fn(mode, lambda: m(inp), [inp, m.weight])
        w = torch.ones(x, device=device, dtype=dtype, requires_grad=True)
        fwd = {"torch": lambda: rmsnorm_ref(inp, w, EPS),
               "torch_compile": lambda: compiled_ref(inp, w, EPS),
               "trainlab": lambda: rmsnorm(inp, w, EPS, impl="triton")}[provider]
        if provider == "torch_compile": fwd()  # compile outside the timed region
        return make_mode_fn(mode, fwd, [inp, w])

    record = (on_cuda or args.record) and not args.no_record
    run_bench("rmsnorm", setup, args.providers or PROVIDERS, args.modes, "H", "hidden size", sizes, device=device,
              extra_config=dict(M=M, dtype=str(dtype).replace("torch.", ""), eps=EPS, quick=quick),
              csv_path=(args.csv or HERE / "results" / "all.csv") if record else None,
              overwrite=True if args.overwrite else None)


if __name__ == "__main__":
    main()
