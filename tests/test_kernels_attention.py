"""Flash-attention kernel vs. its SDPA reference (trainlab.kernels.attention; its masks and tiles are
in trainlab.kernels.attention_tiles, its backward kernels in trainlab.kernels.attention_bwd).

CPU: run with TRITON_INTERPRET=1 (tests/conftest.py sets it) so impl="triton" runs the kernels in the interpreter.
GPU: `TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_attention.py` adds the bf16/fp16 three-way checks.
"""
import math
import pickle

import pytest
import torch

from trainlab.kernels import attention_tiles as tiles
from trainlab.kernels.attention import (
    attention_mask, attention_tile_map, flash_attention, flash_attention_fwd, flash_attention_ref, make_attention)
from trainlab.kernels.utils import assert_close_3way, interpreting, max_abs_err
from kernel_checks import assert_raises_with

# Stated tolerances. Observed max abs errors over this matrix (o, dq, dk, dv, lse): fp64 <= 7.1e-15, fp32 <= 1.9e-6;
# the fp16 GPU code path (interpreter): kernel 2.0e-3 vs fp16 PyTorch 2.0e-3 against the fp32 reference
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
NAMES = ("o", "dq", "dk", "dv")



@pytest.fixture
def small_tiles(monkeypatch):
    "16 x 16 tiles in the interpreter (and the smallest on a GPU): several tiles per side, loops and skipping live."
    monkeypatch.setitem(tiles.TILE_LIMITS, "interpret", dict(tiles.TILE_LIMITS["interpret"], max_block=16))
    monkeypatch.setitem(tiles.TILE_LIMITS, "gpu", dict(tiles.TILE_LIMITS["gpu"], fwd=(16, 16), bwd=(16, 16)))


def random_docs(B, L, n_docs, seed=0):
    "doc_ids [B, L]: each row cut into n_docs contiguous documents at random boundaries (ids 0..n_docs-1)."
    g = torch.Generator().manual_seed(seed)
    n_docs = max(1, min(n_docs, L))
    cuts = torch.stack([torch.randperm(L - 1, generator=g)[:n_docs - 1] + 1 for _ in range(B)]) if n_docs > 1 else torch.zeros(B, 0, dtype=torch.long)
    return (torch.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1)


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(4)]  # q, k, v, do


def fwd_bwd(f, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = f(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def lse_ref(q, k, causal, doc_ids):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    m = attention_mask(q.shape[-2], causal, doc_ids, q.device)
    return (s if m is None else s.masked_fill(~m, float("-inf"))).logsumexp(-1)


def check_parity(q, k, v, do, causal, doc_ids, **tol):
    tol = tol or TOL[q.dtype]
    out = fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal, doc_ids, impl="triton"), q, k, v, do)
    ref = fwd_bwd(lambda a, b, c: flash_attention_ref(a, b, c, causal, doc_ids), q, k, v, do)
    errs = {}
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, (name, o.dtype, r.dtype, o.shape, r.shape)
        torch.testing.assert_close(o, r, **tol, msg=lambda m: f"{name}: {m}")
        errs[name] = max_abs_err(o, r)
    _, lse = flash_attention_fwd(q, k, v, causal, doc_ids)
    assert lse.isfinite().all(), "a row had no visible key"  # impossible by construction: M_ii always holds
    torch.testing.assert_close(lse.double(), lse_ref(q, k, causal, doc_ids), **tol)
    errs["lse"] = max_abs_err(lse, lse_ref(q, k, causal, doc_ids))
    return errs


SHAPES = [(1, 1, 1, 16), (2, 3, 7, 32), (1, 2, 33, 64), (2, 1, 100, 16), (1, 1, 20, 128)]  # (B, H, L, Dh)


@pytest.mark.parametrize("docs", [0, 3], ids=["nodocs", "docs"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_fp32(shape, causal, docs, dev):
    q, k, v, do = make(shape, torch.float32, dev)
    doc_ids = random_docs(shape[0], shape[2], docs).to(dev) if docs else None
    check_parity(q, k, v, do, causal, doc_ids)


@pytest.mark.parametrize("docs", [0, 4], ids=["nodocs", "docs"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(2, 2, 33, 32), (1, 1, 7, 16)], ids=lambda s: "x".join(map(str, s)))
def test_parity_fp64(shape, causal, docs, dev):
    q, k, v, do = make(shape, torch.float64, dev)
    doc_ids = random_docs(shape[0], shape[2], docs).to(dev) if docs else None
    check_parity(q, k, v, do, causal, doc_ids)


@pytest.mark.parametrize("causal, docs, L", [(True, 0, 47), (False, 0, 40), (True, 5, 100), (False, 3, 47)])
def test_parity_many_tiles(causal, docs, L, dev, small_tiles):
    "16 x 16 tiles: L not a multiple of the tile, several loop trips, tile skipping, document ranges."
    q, k, v, do = make((1, 2, L, 16), torch.float64, dev, seed=L)
    doc_ids = random_docs(1, L, docs, seed=L).to(dev) if docs else None
    check_parity(q, k, v, do, causal, doc_ids)


def test_non_contiguous_documents(dev, small_tiles):
    "A document id in two separate runs (e.g. [0 0 1 1 0 0]): no skipping by runs, still exact."
    L = 33
    doc = torch.tensor([0] * 10 + [1] * 12 + [0] * 6 + [2] * 5)
    doc_ids = torch.stack([doc, doc.roll(7)]).to(dev)
    q, k, v, do = make((2, 1, L, 16), torch.float64, dev, seed=3)
    for causal in (True, False):
        check_parity(q, k, v, do, causal, doc_ids)


def test_many_documents_and_singletons(dev):
    "Every token its own document, and documents of one token among long ones."
    L = 37
    q, k, v, do = make((1, 1, L, 32), torch.float64, dev, seed=5)
    alone = torch.arange(L)[None].to(dev)
    mixed = torch.tensor([[0] * 20 + list(range(1, 8)) + [8] * 10]).to(dev)
    for doc_ids in (alone, mixed):
        for causal in (True, False):
            check_parity(q, k, v, do, causal, doc_ids)
    o = flash_attention(q, k, v, True, alone, impl="triton")
    torch.testing.assert_close(o, v, **TOL[torch.float64])  # a token alone in its document attends only to itself


def _nan_in(t, sl):
    t = t.clone(); t[:, :, sl] = float("nan"); return t


def test_tile_skipping_never_reads_masked_tiles(dev, small_tiles):
    """NaN in tiles that must never be read: a kernel that visits a fully masked tile multiplies them by zero
    probabilities and returns NaN. Tiles are 16 wide; documents split at 16."""
    L = 48
    q, k, v, do = make((1, 1, L, 16), torch.float64, dev, seed=1)
    leaf = lambda *ts: [t.detach().requires_grad_() for t in ts]
    # causal forward and dq: query tile 0 never reads key tiles 1 and 2
    a, b, c = leaf(q, k, _nan_in(v, slice(16, None)))
    o = flash_attention(a, b, c, impl="triton")
    assert o[:, :, :16].isfinite().all() and o[:, :, 16:].isnan().any()
    dq, = torch.autograd.grad(o, a, do)
    assert dq[:, :, :16].isfinite().all()
    # causal dk/dv: key tile n never reads query tiles < n (NaN upstream gradient on query tile 0)
    a, b, c = leaf(q, k, v)
    dk, dv = torch.autograd.grad(flash_attention(a, b, c, impl="triton"), (b, c), _nan_in(do, slice(0, 16)))
    assert dk[:, :, 16:].isfinite().all() and dv[:, :, 16:].isfinite().all() and dv[:, :, :16].isnan().any()
    # documents [0, 16) and [16, 48), causal or not: no tile of one document reads a tile of the other
    doc_ids = (torch.arange(L) >= 16).long()[None].to(dev)
    for causal in (True, False):
        a, b, c = leaf(q, k, _nan_in(v, slice(16, None)))
        o = flash_attention(a, b, c, causal, doc_ids, impl="triton")
        assert o[:, :, :16].isfinite().all()
        dq, = torch.autograd.grad(o, a, do)
        assert dq[:, :, :16].isfinite().all()
        a, b, c = leaf(q, k, v)
        dk, dv = torch.autograd.grad(flash_attention(a, b, c, causal, doc_ids, impl="triton"), (b, c), _nan_in(do, slice(16, None)))
        assert dk[:, :, :16].isfinite().all() and dv[:, :, :16].isfinite().all()
    # without the document mask the same NaN values are read (the check above is not vacuous)
    assert flash_attention(q, k, _nan_in(v, slice(16, None)), False, None, impl="triton")[:, :, :16].isnan().all()


def test_tile_map():
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([10, 30, 4, 20]))[None]
    causal = attention_tile_map(64, True, None, 8, 8)[0]
    assert torch.equal(causal, torch.ones(8, 8, dtype=torch.bool).tril())
    assert attention_tile_map(64, False, None, 8, 8).all()
    docmap = attention_tile_map(64, True, doc, 8, 8)[0]
    assert int(docmap.sum()) == 18 and not (docmap & ~causal).any()
    # every visible (query, key) pair lies in a visited tile
    m = attention_mask(64, True, doc)[0, 0]
    need = m.view(8, 8, 8, 8).any(3).any(1)
    assert not (need & ~docmap).any()
    # non-contiguous ids fall back to full rows (intersected with causality)
    bad = torch.tensor([[0] * 30 + [1] * 4 + [0] * 30])
    assert torch.equal(attention_tile_map(64, True, bad, 8, 8)[0], causal)


def test_non_contiguous_inputs(dev):
    "q from a transpose ([B, L, H, D] -> [B, H, L, D]), k with a stride-2 head dim, v sliced, doc_ids transposed, expanded dO."
    B, H, L, D = 2, 2, 21, 16
    g = torch.Generator().manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dev)
    q = rnd(B, L, H, D).transpose(1, 2)
    k = rnd(B, H, L, 2 * D)[..., ::2]
    v = rnd(B, H, 2 * L, D)[:, :, 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    doc_ids = random_docs(B, L, 3).T.contiguous().T.to(dev)
    assert not doc_ids.is_contiguous()
    do = rnd(B, L, H, D).transpose(1, 2)
    for causal in (True, False):
        check_parity(q, k, v, do, causal, doc_ids)
    # an expanded (stride-0) upstream gradient, as from o.sum()
    grads = []
    for f in (lambda *a: flash_attention(*a, impl="triton"), flash_attention_ref):
        a, b, c = (t.detach().requires_grad_() for t in (q, k, v))
        f(a, b, c).sum().backward()
        grads.append((a.grad, b.grad, c.grad))
    for x, y in zip(*grads): torch.testing.assert_close(x, y, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
def test_doc_id_dtypes_and_values(dtype, dev):
    "Any integer dtype; ids need not be sorted, small or positive (int64 ids beyond the int32 range too)."
    L = 19
    q, k, v, do = make((2, 1, L, 16), torch.float64, dev, seed=4)
    doc = random_docs(2, L, 3, seed=9)
    ids = {torch.int64: doc * (2**40) - 5, torch.uint8: 200 + doc}.get(dtype, 7 - 3 * doc).to(dtype)
    check_parity(q, k, v, do, True, ids.to(dev))


def test_only_some_inputs_need_grad(dev):
    q, k, v, do = make((1, 2, 9, 16), torch.float64, dev)
    q.requires_grad_()
    o = flash_attention(q, k, v, impl="triton")
    dq, = torch.autograd.grad(o, q, do)
    q2 = q.detach().requires_grad_()
    dq_ref, = torch.autograd.grad(flash_attention_ref(q2, k, v), q2, do)
    torch.testing.assert_close(dq, dq_ref, **TOL[torch.float64])
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    dk, dv = torch.autograd.grad(flash_attention(q.detach(), kk, vv, False, impl="triton"), (kk, vv), do)
    ref = torch.autograd.grad(flash_attention_ref(q.detach(), kk, vv, False), (kk, vv), do)
    torch.testing.assert_close((dk, dv), ref, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(0, 2, 5, 16), (2, 0, 5, 16), (2, 2, 0, 16)])
def test_empty(shape, dev):
    q, k, v = (torch.randn(shape, device=dev, requires_grad=True) for _ in range(3))
    doc_ids = torch.zeros(shape[0], shape[2], dtype=torch.long, device=dev)
    o = flash_attention(q, k, v, True, doc_ids, impl="triton")
    assert o.shape == shape and o.dtype == q.dtype
    o.sum().backward()
    assert q.grad.shape == shape and k.grad.shape == shape
    assert flash_attention_ref(q, k, v, True, doc_ids).shape == shape


def test_gradcheck(dev):
    q, k, v, _ = make((1, 1, 6, 16), torch.float64, dev)
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2]], device=dev)
    for causal, docs in ((True, None), (False, doc_ids)):
        args = [t.detach().requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal, docs, impl="triton"), args, fast_mode=True)


def test_low_precision_code_path_in_interpreter(monkeypatch):
    """The GPU's fp16/bf16 path (tiles into tl.dot as loaded, p rounded to the input dtype) run on CPU with fp16,
    whose interpreter arithmetic is sound (bf16's is not). Three-way rule against fp16 PyTorch."""
    if not interpreting(): pytest.skip("interpreter-only check of the GPU code path")
    monkeypatch.setitem(tiles.TILE_LIMITS, "interpret", dict(tiles.TILE_LIMITS["interpret"], lowp_dot=True))
    assert tiles.tile_config(33, 32, torch.float16, True, "fwd")["LOWP"]
    q, k, v, do = make((2, 2, 33, 32), torch.float32, "cpu")
    q, k, v, do = (t.half() for t in (q, k, v, do))
    doc_ids = random_docs(2, 33, 3)
    out = fwd_bwd(lambda a, b, c: flash_attention(a, b, c, True, doc_ids, impl="triton"), q, k, v, do)
    ref = fwd_bwd(lambda a, b, c: flash_attention_ref(a, b, c, True, doc_ids), q.float(), k.float(), v.float(), do.float())
    base = fwd_bwd(lambda a, b, c: flash_attention_ref(a, b, c, True, doc_ids, upcast=False), q, k, v, do)
    for name, o, r, b in zip(NAMES, out, ref, base):
        assert o.dtype == torch.float16
        assert_close_3way(o, r, b, name=name)


def test_fp16_inputs_compute_in_fp32(dev):
    "Default interpreter path for fp16: tiles converted to fp32 at load, outputs fp16."
    q, k, v, do = (t.half() for t in make((1, 2, 20, 16), torch.float32, dev))
    out = fwd_bwd(lambda a, b, c: flash_attention(a, b, c, impl="triton"), q, k, v, do)
    ref = fwd_bwd(flash_attention_ref, q.float(), k.float(), v.float(), do.float())
    for name, o, r in zip(NAMES, out, ref):
        assert o.dtype == torch.float16
        assert max_abs_err(o, r) < 1e-2, name


def test_auto_and_torch_on_cpu_run_the_reference():
    q, k, v, _ = make((2, 2, 9, 16), torch.float32, "cpu")
    doc_ids = random_docs(2, 9, 2)
    assert torch.equal(flash_attention(q, k, v), flash_attention_ref(q, k, v))
    assert torch.equal(flash_attention(q, k, v, False, doc_ids, impl="torch"), flash_attention_ref(q, k, v, False, doc_ids))
    assert torch.equal(make_attention()(q, k, v, causal=True, doc_ids=doc_ids), flash_attention_ref(q, k, v, True, doc_ids))


def test_reference():
    "The reference against an explicit masked softmax, and packed documents against separate sequences."
    q, k, v, _ = make((2, 2, 12, 16), torch.float64, "cpu")
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [3] * 12])
    for causal in (True, False):
        for docs in (None, doc_ids):
            s = q @ k.transpose(-1, -2) / 4.0
            m = attention_mask(12, causal, docs)
            if m is not None: s = s.masked_fill(~m, float("-inf"))
            torch.testing.assert_close(flash_attention_ref(q, k, v, causal, docs), s.softmax(-1) @ v)
        packed = flash_attention_ref(q[:1], k[:1], v[:1], causal, doc_ids[:1])
        sep = torch.cat([flash_attention_ref(q[:1, :, s], k[:1, :, s], v[:1, :, s], causal) for s in (slice(0, 5), slice(5, 12))], 2)
        torch.testing.assert_close(packed, sep)
    qb = q.to(torch.bfloat16)
    assert flash_attention_ref(qb, qb, qb).dtype == torch.bfloat16
    assert flash_attention_ref(qb, qb, qb, upcast=False).dtype == torch.bfloat16
    assert attention_mask(5, False) is None


def test_in_tiny_lm(dev):
    "TinyLM with the kernel as its attention: same logits as the default SDPA model, with and without documents."
    from trainlab.model import ModelConfig, TinyLM
    cfg = ModelConfig(vocab_size=50, d_model=64, n_layers=2, n_heads=2, max_seq_len=64)  # head_dim 32
    torch.manual_seed(0)
    base = TinyLM(cfg).to(dev).double()
    flash = TinyLM(cfg, attention=make_attention("triton")).to(dev).double()
    flash.load_state_dict(base.state_dict())
    ids = torch.randint(0, 50, (2, 29), device=dev)
    doc_ids = torch.tensor([[0] * 11 + [1] * 18, [5] * 29], device=dev)
    for d in (None, doc_ids):
        torch.testing.assert_close(flash(ids, doc_ids=d).logits, base(ids, doc_ids=d).logits, atol=1e-10, rtol=1e-10)
    labels = ids.roll(-1, 1)
    losses = [m(ids, labels=labels, doc_ids=doc_ids).loss.mean() for m in (base, flash)]
    gb, gf = (torch.autograd.grad(l, list(m.parameters())) for l, m in zip(losses, (base, flash)))
    for x, y in zip(gf, gb): torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_make_attention_is_picklable():
    f = pickle.loads(pickle.dumps(make_attention("torch")))
    q = torch.randn(1, 1, 4, 16)
    assert torch.equal(f(q, q, q), flash_attention_ref(q, q, q))


Q = torch.randn(2, 3, 8, 16)
DOC = torch.zeros(2, 8, dtype=torch.long)
ERRORS = [
    (lambda: flash_attention(Q, Q[:, :2], Q), ValueError, "`k`: expected shape (2, 3, 8, 16)"),
    (lambda: flash_attention(Q, Q, Q[:, :, :7]), ValueError, "`v`: expected shape (2, 3, 8, 16)"),
    (lambda: flash_attention(Q[0], Q[0], Q[0]), ValueError, "`q`: expected 4 dimension(s)"),
    (lambda: flash_attention(Q[..., :8], Q[..., :8], Q[..., :8]), ValueError, "`q`: expected a head dimension (last dim) of 16, 32, 64 or 128"),
    (lambda: flash_attention(torch.randn(1, 1, 4, 256), torch.randn(1, 1, 4, 256), torch.randn(1, 1, 4, 256)), ValueError, "`q`: expected a head dimension"),
    (lambda: flash_attention(Q.long(), Q, Q), TypeError, "`q`: expected dtype"),
    (lambda: flash_attention(Q, Q.double(), Q), TypeError, "`k`: expected dtype float32 (the dtype of `q`)"),
    (lambda: flash_attention(Q, Q, Q.half()), TypeError, "`v`: expected dtype float32"),
    (lambda: flash_attention(Q.numpy(), Q, Q), TypeError, "`q`: expected a torch.Tensor"),
    (lambda: flash_attention(Q, Q, Q, causal=1), TypeError, "`causal`: expected True or False"),
    (lambda: flash_attention(Q, Q, Q, doc_ids=DOC[:, :7]), ValueError, "`doc_ids`: expected shape (2, 8)"),
    (lambda: flash_attention(Q, Q, Q, doc_ids=DOC[:1]), ValueError, "`doc_ids`: expected shape (2, 8)"),
    (lambda: flash_attention(Q, Q, Q, doc_ids=DOC[0]), ValueError, "`doc_ids`: expected 2 dimension(s)"),
    (lambda: flash_attention(Q, Q, Q, doc_ids=DOC.float()), TypeError, "`doc_ids`: expected dtype int8"),
    (lambda: flash_attention(Q, Q, Q, doc_ids=DOC.bool()), TypeError, "`doc_ids`: expected dtype"),
    (lambda: flash_attention(Q, Q, Q, doc_ids=DOC.to("meta")), ValueError, "`doc_ids` is on meta but `q` is on cpu"),
    (lambda: flash_attention(Q, Q.to("meta"), Q), ValueError, "`k` is on meta but `q` is on cpu"),
    (lambda: flash_attention(Q, Q, Q, impl="cuda"), ValueError, "`impl`: expected one of 'auto', 'triton', 'torch'"),
    (lambda: make_attention("fast"), ValueError, "`impl`"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    assert_raises_with(*ERRORS[i])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [((2, 4, 1000, 64), True, 5), ((1, 2, 4096, 128), True, 0), ((3, 2, 257, 32), False, 3),
                                  ((4, 8, 512, 16), True, 0), ((1, 1, 1, 64), True, 0), ((2, 2, 777, 128), False, 0)],
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-{'causal' if c[1] else 'full'}-docs{c[2]}")
def test_low_precision_gpu(case, dtype):
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("low-precision checks need compiled kernels: run with TRITON_INTERPRET=0")
    shape, causal, docs = case
    q, k, v, do = (t.to(dtype) for t in make(shape, torch.float32, "cuda"))
    doc_ids = random_docs(shape[0], shape[2], docs).cuda() if docs else None
    out = fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal, doc_ids, impl="triton"), q, k, v, do)
    ref = fwd_bwd(lambda a, b, c: flash_attention_ref(a, b, c, causal, doc_ids), q.float(), k.float(), v.float(), do.float())
    base = fwd_bwd(lambda a, b, c: flash_attention_ref(a, b, c, causal, doc_ids, upcast=False), q, k, v, do)
    for name, o, r, b in zip(NAMES, out, ref, base):
        assert o.dtype == dtype
        assert_close_3way(o, r, b, name=name)
    assert flash_attention_fwd(q, k, v, causal, doc_ids)[1].isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 4, 1000, 64), (1, 2, 300, 128)])
def test_fp32_gpu(shape):
    "fp32 on a GPU uses IEEE dots (no TF32): the CPU tolerance holds."
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("run with TRITON_INTERPRET=0")
    q, k, v, do = make(shape, torch.float32, "cuda")
    doc_ids = random_docs(shape[0], shape[2], 4).cuda()
    check_parity(q, k, v, do, True, doc_ids, atol=1e-4, rtol=1e-4)
