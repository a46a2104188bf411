#!/usr/bin/env python
"""Benchmark attention over packed documents: trainlab's Triton flash attention against SDPA (dense, padded and
with a boolean document mask) and FlexAttention with a document mask_mod (when importable).

GPU:  python kernels/bench_attention.py          bf16, 16384 tokens per batch (B = 16384 / L), 8 heads, Dh = 64,
                                                 L = 512..8192, three document-length mixes, forward/backward/full,
                                                 speed and peak memory, appended to kernels/results/all.csv (+ plots)
CPU:  python kernels/bench_attention.py --quick  smoke run of the torch providers on tiny sizes; nothing recorded

Every provider computes causal attention. Providers (all measured in the same run):
  sdpa         F.scaled_dot_product_attention(is_causal=True) on the packed rows. It IGNORES document boundaries: the
               dense causal cost that a packed kernel competes with, not an equivalent computation (except for mix `causal`)
  sdpa_padded  every document as its own sequence, batched and padded to the longest document, is_causal=True
               (equivalent; spends compute on padding; the padded copy is built outside the timed region)
  sdpa_mask    SDPA with the boolean [B, 1, L, L] document-causal mask (equivalent; the mask rules out the flash backend)
  flex         FlexAttention with a document-causal mask_mod, block mask built outside the timed region; torch.compile'd
               on CUDA, eager (forward only) on CPU
  trainlab     trainlab.kernels.flash_attention(q, k, v, causal=True, doc_ids, impl="triton")
Document-length mixes (one CSV kernel_name each, `flash_attention_<mix>`; x = L):
  causal       one document per row (no doc_ids: plain causal attention)
  docs_short   documents of 32..512 tokens (uniform), packed
  docs_mixed   log-uniform document lengths in [16, L] (a heavy tail, like a real corpus), packed
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

from trainlab.kernels.attention import attention_mask, attention_tile_map, flash_attention
from trainlab.kernels.utils import interpreting
from benchlib import SkipCase, allow_retained_graph_backward, bench_argparser, make_mode_fn, run_bench

PROVIDERS = ("sdpa", "sdpa_padded", "sdpa_mask", "flex", "trainlab")
MIXES = ("causal", "docs_short", "docs_mixed")


def doc_lengths(mix: str, L: int, g: torch.Generator) -> list[int]:
    "Lengths of the documents packed into one row of L tokens (the last one cut to fit)."
    if mix == "causal": return [L]
    lens, total = [], 0
    while total < L:
        if mix == "docs_short": n = int(torch.randint(32, 513, (1,), generator=g))
        elif mix == "docs_mixed": n = int(math.exp(math.log(16) + (math.log(L) - math.log(16)) * float(torch.rand(1, generator=g))))
        else: raise ValueError(f"`mix`: expected one of {', '.join(MIXES)}, got {mix!r}")
        n = min(max(n, 1), L - total)
        lens.append(n); total += n
    return lens


def make_docs(mix: str, B: int, L: int, seed: int = 0) -> tuple[torch.Tensor | None, list[list[int]]]:
    "doc_ids [B, L] (None for `causal`) and the document lengths of each row."
    g = torch.Generator().manual_seed(seed)
    lens = [doc_lengths(mix, L, g) for _ in range(B)]
    if mix == "causal": return None, lens
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lens])
    return ids, lens


def pad_documents(t: torch.Tensor, lens: list[list[int]]) -> torch.Tensor:
    "[B, H, L, D] packed -> [n_docs, H, max_len, D]: each document its own sequence, zero-padded at the end."
    pieces = [t[b, :, s:s + n] for b, row in enumerate(lens) for s, n in zip([0, *torch.tensor(row).cumsum(0).tolist()[:-1]], row)]
    Lmax = max(p.shape[1] for p in pieces)
    return torch.stack([F.pad(p, (0, 0, 0, Lmax - p.shape[1])) for p in pieces])


def main(argv=None):
    p = bench_argparser(__doc__)
    p.add_argument("--mixes", nargs="*", default=list(MIXES), choices=list(MIXES), help="document-length mixes")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch, B = tokens / L (default 16384; 256 with --quick)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 8; 2 with --quick)")
    p.add_argument("--head-dim", type=int, default=None, choices=[16, 32, 64, 128], help="Dh (default 64; 32 with --quick)")
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="sequence lengths L (default 512..8192; 64 128 with --quick)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    tokens = args.tokens or (256 if quick else 16384)
    H, D = args.heads or (2 if quick else 8), args.head_dim or (32 if quick else 64)
    lengths = args.lengths or ([64, 128] if quick else [512, 1024, 2048, 4096, 8192])
    record = (on_cuda or args.record) and not args.no_record
    compiled = {}

    def flex_fn():
        from torch.nn.attention.flex_attention import flex_attention
        if not on_cuda: return flex_attention  # eager, unfused; CPU has no FlexAttention backward
        if "flex" not in compiled:
            allow_retained_graph_backward()
            compiled["flex"] = torch.compile(flex_attention, dynamic=False)
        return compiled["flex"]

    for mix in args.mixes:
        def setup(provider, mode, x, mix=mix):
            L = x
            B = max(1, tokens // L)
            doc_ids, lens = make_docs(mix, B, L)
            doc_ids = doc_ids.to(device) if doc_ids is not None else None
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
            if provider == "sdpa":
                return make_mode_fn(mode, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])
            if provider == "sdpa_padded":
                qp, kp, vp = (pad_documents(t.detach(), lens).requires_grad_() for t in (q, k, v))
                return make_mode_fn(mode, lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True), [qp, kp, vp])
            if provider == "sdpa_mask":
                mask = attention_mask(L, True, doc_ids, device)
                return make_mode_fn(mode, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v])
            if provider == "flex":
                try:
                    from torch.nn.attention.flex_attention import create_block_mask
                except ImportError as e:
                    raise SkipCase(f"FlexAttention not importable ({e})")
                if not on_cuda and mode != "forward": raise SkipCase("FlexAttention has no backward on CPU")
                if doc_ids is None:
                    def mask_mod(b, h, qi, kj): return qi >= kj
                else:
                    def mask_mod(b, h, qi, kj): return (qi >= kj) & (doc_ids[b, qi] == doc_ids[b, kj])
                block_mask = create_block_mask(mask_mod, B, None, L, L, device=device)
                fn = flex_fn()
                qf, kf, vf = (q, k, v) if on_cuda else (q.detach(), k.detach(), v.detach())  # CPU: forward without autograd
                fwd = lambda: fn(qf, kf, vf, block_mask=block_mask)
                fwd()  # compile outside the timed region
                return make_mode_fn(mode, fwd, [q, k, v])
            if provider == "trainlab":
                if not on_cuda: raise SkipCase("Triton kernels are timed on CUDA only (the interpreter is for correctness)")
                if interpreting(): raise SkipCase("kernels were defined under TRITON_INTERPRET=1; unset it to time them")
                return make_mode_fn(mode, lambda: flash_attention(q, k, v, True, doc_ids, impl="triton"), [q, k, v])
            raise SkipCase(f"unknown provider {provider!r}")

        docs_per_row = [len(make_docs(mix, 1, L)[1][0]) for L in lengths]
        tiles = [float(attention_tile_map(L, True, make_docs(mix, 1, L)[0], 64, 64).float().mean()) for L in lengths]
        print(f"mix {mix}: documents per row {dict(zip(lengths, docs_per_row))}; "
              f"fraction of 64x64 tiles visited {dict(zip(lengths, [round(t, 3) for t in tiles]))}")
        run_bench(f"flash_attention_{mix}", setup, args.providers or PROVIDERS, args.modes, "L", "sequence length", lengths,
                  device=device, extra_config=dict(tokens=tokens, H=H, Dh=D, dtype=str(dtype).replace("torch.", ""),
                                                   mix=mix, causal=True, quick=quick),
                  csv_path=(args.csv or HERE / "results" / "all.csv") if record else None,
                  overwrite=True if args.overwrite else None)


if __name__ == "__main__":
    main()
