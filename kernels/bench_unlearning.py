#!/usr/bin/env python
"""Benchmark the unlearning kernels: WHP generic labels (argmax of base - alpha * relu(reinforced - base)) and
KL(softmax(p) || softmax(q)) per row, against torch eager (the same expressions in the inputs' dtype), torch.compile of
them, Liger-Kernel's KL (if installed; it takes log-probabilities, so log_softmax is included) and trainlab's Triton kernels.

GPU:  python kernels/bench_unlearning.py          bf16; vocab 32000/50257/128256 at 4096 rows (kernel names `generic_labels`,
                                                  `kl_div`) and rows 1024/4096/16384 at vocab 128256 (`generic_labels_by_rows`,
                                                  `kl_div_by_rows`); speed and peak memory, appended to kernels/results/all.csv
                                                  (+ plots). generic_labels: forward only (integer labels have no gradient);
                                                  kl_div: reduction "mean", gradient for q only (P is a frozen reference model)
CPU:  python kernels/bench_unlearning.py --quick  smoke run of the torch providers on tiny sizes; nothing recorded unless --record
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from trainlab.kernels.unlearn import generic_labels, generic_labels_ref, kl_div, kl_div_ref
from trainlab.kernels.utils import interpreting
from benchlib import (
    SkipCase, allow_retained_graph_backward, bench_argparser, make_mode_fn, require_compiled, run_bench)

PROVIDERS = ("torch", "torch_compile", "liger", "trainlab")
OPS = ("generic_labels", "kl_div")
SWEEPS = ("vocab", "rows")
ALPHA = 1.0



def _liger_kl():
    try:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    except ImportError as e:
        raise SkipCase(f"liger-kernel not importable ({e})")
    loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)  # sum / rows = our "mean" over rows
    # Liger's kl_div(y_pred, y_true) = KL(y_true || y_pred) on log-probabilities
    return lambda p, q: loss_fn(F.log_softmax(q, -1), F.log_softmax(p, -1))


def main(argv=None):
    p = bench_argparser(__doc__)
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    p.add_argument("--sweeps", nargs="*", default=list(SWEEPS), choices=list(SWEEPS),
                   help="vocab: vocabulary sizes at fixed rows; rows: row counts at the largest vocabulary")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    if quick: BT, vocabs, V_rows, rows = 256, [1000, 4096], 4096, [64, 256]
    else: BT, vocabs, V_rows, rows = 4096, [32000, 50257, 128256], 128256, [1024, 4096, 16384]
    record = (on_cuda or args.record) and not args.no_record
    csv_path = (args.csv or HERE / "results" / "all.csv") if record else None
    compiled = {}  # built on first use: importing torch.compile's machinery takes seconds

    def compiled_fn(name, fn):
        if name not in compiled:
            allow_retained_graph_backward()
            compiled[name] = torch.compile(fn)
        return compiled[name]

    def sizes(sweep, x):
        return (BT, x) if sweep == "vocab" else (x, V_rows)

    def setup_labels(sweep):
        def setup(provider, mode, x):
            if mode != "forward": raise SkipCase("integer labels have no gradient: forward only")
            if provider == "liger": raise SkipCase("Liger-Kernel has no generic-label kernel")
            require_compiled(provider, on_cuda)
            n, v = sizes(sweep, x)
            g = torch.Generator(device=device).manual_seed(0)
            b = torch.randn(n, v, device=device, dtype=dtype, generator=g)
            r = (b.float() + 0.5 * torch.randn(n, v, device=device, generator=g)).to(dtype)
            ref = lambda b, r: generic_labels_ref(b, r, ALPHA, upcast=False)  # eager, in the inputs' dtype
            fwd = {"torch": lambda: ref(b, r),
                   "torch_compile": lambda: compiled_fn("labels", ref)(b, r),
                   "trainlab": lambda: generic_labels(b, r, ALPHA, impl="triton")}[provider]
            fwd()  # compile / JIT outside the timed region
            return fwd, []
        return setup

    def setup_kl(sweep):
        def setup(provider, mode, x):
            require_compiled(provider, on_cuda)
            n, v = sizes(sweep, x)
            g = torch.Generator(device=device).manual_seed(0)
            pl = torch.randn(n, v, device=device, dtype=dtype, generator=g)  # frozen reference model: no gradient
            ql = (pl.float() + 0.5 * torch.randn(n, v, device=device, generator=g)).to(dtype).requires_grad_()
            ref = lambda p, q: kl_div_ref(p, q, "mean", upcast=False)
            if provider == "liger": f = _liger_kl()
            else: f = {"torch": ref, "torch_compile": compiled_fn("kl", ref),
                       "trainlab": lambda p, q: kl_div(p, q, "mean", impl="triton")}[provider]
            fwd = lambda: f(pl, ql)
            fwd()  # compile / JIT outside the timed region
            return make_mode_fn(mode, fwd, [ql])
        return setup

    cfg = dict(dtype=str(dtype).replace("torch.", ""), quick=quick, alpha=ALPHA)
    for op in args.ops:
        for sweep in args.sweeps:
            name = op if sweep == "vocab" else f"{op}_by_rows"
            x_name, x_label, xs = ("V", "vocab size", vocabs) if sweep == "vocab" else ("BT", "rows (tokens)", rows)
            extra = dict(cfg, BT=BT) if sweep == "vocab" else dict(cfg, V=V_rows)
            if op == "kl_div": extra.update(reduction="mean", grad="q only")
            setup = (setup_labels if op == "generic_labels" else setup_kl)(sweep)
            modes = [m for m in args.modes if m == "forward"] if op == "generic_labels" else args.modes
            run_bench(name, setup, args.providers or PROVIDERS, modes, x_name, x_label, xs, device=device,
                      extra_config=extra, csv_path=csv_path, overwrite=True if args.overwrite else None)


if __name__ == "__main__":
    main()
