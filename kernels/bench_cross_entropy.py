#!/usr/bin/env python
"""Benchmark cross entropy and linear (fused) cross entropy: torch eager (F.cross_entropy on the logits' dtype, and the
naive full-logits linear + CE), torch.compile of the same, Liger-Kernel (if installed) and trainlab's Triton kernels.

GPU:  python kernels/bench_cross_entropy.py          bf16, vocab 32000..256000 at 4096 tokens (H = 4096 for linear CE),
                                                     forward/backward/full, speed and peak memory, appended to
                                                     kernels/results/all.csv (+ plots)
CPU:  python kernels/bench_cross_entropy.py --quick  smoke run of the torch providers on tiny sizes; nothing recorded
--num-groups G (G >= 1): also compute per-group loss sums and counts (`group_ids` random in [0, G)) in every provider
      that supports them (torch: scatter_add/bincount on the reference's per-row losses; trainlab: in the kernel; Liger
      skipped); rows go under `cross_entropy_grouped` / `fused_linear_cross_entropy_grouped`, to compare with the plain rows
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import trainlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

from trainlab.kernels import cross_entropy, cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_ref
from trainlab.kernels.utils import interpreting
from benchlib import (
    SkipCase, allow_retained_graph_backward, bench_argparser, make_mode_fn, require_compiled, run_bench)

PROVIDERS = ("torch", "torch_compile", "liger", "trainlab")
OPS = ("cross_entropy", "fused_linear_cross_entropy")


def _liger(name):
    try:
        if name == "cross_entropy":
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
            return LigerCrossEntropyLoss()
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss()
    except ImportError as e:
        raise SkipCase(f"liger-kernel not importable ({e})")



def main(argv=None):
    p = bench_argparser(__doc__)
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    p.add_argument("--num-groups", type=int, default=0, help="G >= 1: add per-group loss sums (group_ids in [0, G))")
    args = p.parse_args(argv)
    G = args.num_groups
    if G < 0: p.error("--num-groups: expected an int >= 0")
    grp = lambda gid: dict(group_ids=gid, num_groups=G) if G else {}
    loss_of = lambda out: out.loss if G else out  # the timed output: the loss (the group sums are computed either way)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    BT, H, vocabs = (256, 64, [1000, 4096]) if quick else (4096, 4096, [32000, 50257, 128256, 256000])
    record = (on_cuda or args.record) and not args.no_record
    csv_path = (args.csv or HERE / "results" / "all.csv") if record else None
    compiled = {}  # built on first use: importing torch.compile's machinery takes seconds

    def ce_compiled(x, t, gid=None):
        if "ce" not in compiled:
            allow_retained_graph_backward()
            compiled["ce"] = torch.compile(lambda x, t, gid: loss_of(cross_entropy_ref(x, t, upcast=False, **grp(gid))))
        return compiled["ce"](x, t, gid)

    def lce_compiled(h, w, t, gid=None):
        if "lce" not in compiled:
            allow_retained_graph_backward()
            compiled["lce"] = torch.compile(lambda h, w, t, gid: loss_of(linear_cross_entropy_ref(h, w, t, upcast=False, **grp(gid))))
        return compiled["lce"](h, w, t, gid)

    def group_ids(g, shape):
        return torch.randint(0, G, shape, device=device, generator=g) if G else None

    def setup_ce(provider, mode, x):
        require_compiled(provider, on_cuda)
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(BT, x, device=device, dtype=dtype, generator=g).requires_grad_()
        t = torch.randint(0, x, (BT,), device=device, generator=g)
        gid = group_ids(g, (BT,))
        if provider == "liger":
            if G: raise SkipCase("Liger-Kernel has no per-group loss sums")
            loss_fn = _liger("cross_entropy")
            fwd = lambda: loss_fn(logits, t)
        else:
            fwd = {"torch": lambda: loss_of(cross_entropy_ref(logits, t, upcast=False, **grp(gid))),
                   "torch_compile": lambda: ce_compiled(logits, t, gid),
                   "trainlab": lambda: loss_of(cross_entropy(logits, t, impl="triton", **grp(gid)))}[provider]
        if provider == "torch_compile": fwd()  # compile outside the timed region
        return make_mode_fn(mode, fwd, [logits])

    def setup_lce(provider, mode, x):
        require_compiled(provider, on_cuda)
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(BT, H, device=device, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(x, H, device=device, dtype=dtype, generator=g) / H ** 0.5).requires_grad_()
        t = torch.randint(0, x, (BT,), device=device, generator=g)
        gid = group_ids(g, (BT,))
        if provider == "liger":
            if G: raise SkipCase("Liger-Kernel has no per-group loss sums")
            loss_fn = _liger("fused_linear_cross_entropy")
            fwd = lambda: loss_fn(w, h, t)  # Liger's order: (lin_weight, input, target)
        else:
            fwd = {"torch": lambda: loss_of(linear_cross_entropy_ref(h, w, t, upcast=False, **grp(gid))),
                   "torch_compile": lambda: lce_compiled(h, w, t, gid),
                   "trainlab": lambda: loss_of(linear_cross_entropy(h, w, t, impl="triton", **grp(gid)))}[provider]
        if provider == "torch_compile": fwd()  # compile outside the timed region
        return make_mode_fn(mode, fwd, [h, w])

    cfg = dict(BT=BT, dtype=str(dtype).replace("torch.", ""), quick=quick, **({"num_groups": G} if G else {}))
    sfx = "_grouped" if G else ""
    if "cross_entropy" in args.ops:
        run_bench("cross_entropy" + sfx, setup_ce, args.providers or PROVIDERS, args.modes, "V", "vocab size", vocabs,
                  device=device, extra_config=cfg, csv_path=csv_path, overwrite=True if args.overwrite else None)
    if "fused_linear_cross_entropy" in args.ops:
        run_bench("fused_linear_cross_entropy" + sfx, setup_lce, args.providers or PROVIDERS, args.modes, "V", "vocab size",
                  vocabs, device=device, extra_config=dict(cfg, H=H), csv_path=csv_path,
                  overwrite=True if args.overwrite else None)


if __name__ == "__main__":
    main()
