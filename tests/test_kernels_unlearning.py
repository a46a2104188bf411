"""Unlearning kernels vs. their references (trainlab.kernels.unlearn): WHP generic labels and KL(softmax(p) || softmax(q)).

CPU: run with TRITON_INTERPRET=1 (tests/conftest.py sets it) so impl="triton" runs the kernels in the interpreter.
GPU: `TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_unlearning.py` adds the bf16/fp16 checks.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from trainlab.kernels import unlearn as ul
from trainlab.kernels.unlearn import generic_labels, generic_labels_ref, generic_logits, kl_div, kl_div_ref
from trainlab.kernels.utils import HAS_TRITON, assert_close_3way, interpreting, max_abs_err
from kernel_checks import assert_raises_with, grads, upstream

# Stated tolerances. Observed max abs errors: fp64 <= 1e-14 (kl), fp32 <= 2e-6 on summed KL, <= 1e-6 elsewhere
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-5)}
SHAPES = [(5, 1), (64, 7), (4, 129), (3, 5, 1000)]  # (..., V): V = 1, 7, 129, 1000, none a tile multiple
REDUCTIONS = ["none", "mean", "sum"]
ALPHAS = [0.0, 0.5, 1.0, 3.0]
INF, NAN = float("inf"), float("nan")

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inf - inf in the interpreter



@pytest.fixture
def small_tiles(monkeypatch):
    "64-wide vocabulary tiles, two rows per program: many tiles and programs, V never a tile multiple."
    for key in ("interpret", "gpu"):
        monkeypatch.setitem(ul._LIMITS, key, dict(max_block_v=64, max_elems=128))
    assert ul._settings(15, 1000, True)[:2] == (2, 64)


def randn(shape, dtype, device, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)


def grid(shape, dtype, device, seed, levels=4):
    "Small integers: many rows have equal maxima at several columns."
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).to(device, dtype)


def check_labels(b, r, alpha):
    out, ref = generic_labels(b, r, alpha, impl="triton"), generic_labels_ref(b, r, alpha)
    assert out.dtype == torch.int64 and out.shape == ref.shape == b.shape[:-1]
    assert torch.equal(out, ref), (out, ref)
    return out


# ---------------------------------------------------------------- generic_labels

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_labels_parity(shape, dtype, dev):
    "Exact equality with torch.argmax of the reference, random logits and coarse ones full of ties."
    for i, alpha in enumerate(ALPHAS):
        check_labels(randn(shape, dtype, dev, i), randn(shape, dtype, dev, 10 + i), alpha)
        check_labels(grid(shape, dtype, dev, i), grid(shape, dtype, dev, 10 + i), alpha)


def test_labels_ties_across_tiles(dev, small_tiles):
    "Equal maxima constructed across tile boundaries (and inside tiles): the smallest index wins, like torch.argmax."
    V = 300  # tiles [0, 64), [64, 128), ..., [256, 300)
    cases = [[70, 130], [63, 64], [5, 40, 299], [299, 256], [128, 127, 200], [0, 64, 128, 192, 256], [299], [17]]
    b = torch.zeros(len(cases), V, dtype=torch.float64)
    for i, cols in enumerate(cases): b[i, cols] = 3.0
    b[3, :256] = -50.0  # earlier tiles all lower, the tie sits in the short last tile
    r = b.clone()  # reinforced == base: v = base
    labels = check_labels(b.to(dev), r.to(dev), 1.0)
    assert labels.tolist() == [min(c) for c in cases]
    r2 = b.clone(); r2[:, 1::2] += 1.0  # reinforcement raised the odd columns: alpha = 1 makes them 2.0 lower
    check_labels(b.to(dev), r2.to(dev), 1.0)
    for dtype in (torch.float32, torch.float64):  # random rows, all ties
        for seed in range(3):
            check_labels(grid((9, V), dtype, dev, seed, levels=3), grid((9, V), dtype, dev, 50 + seed, levels=3), 0.5)
    x = torch.full((2, 130), 1.0, dtype=torch.float64, device=dev)  # constant rows: index 0
    assert check_labels(x, x, 2.0).tolist() == [0, 0]


def test_labels_small_tiles_random(dev, small_tiles):
    for shape, dtype in [((2, 1000), torch.float32), ((7, 129), torch.float64), ((9, 1), torch.float32), ((3, 64), torch.float64)]:
        for alpha in (0.0, 1.0, 2.5):
            check_labels(randn(shape, dtype, dev, 1), randn(shape, dtype, dev, 2), alpha)


def test_labels_alpha_zero_is_base_argmax(dev):
    b, r = randn((6, 1000), torch.float32, dev, 3), randn((6, 1000), torch.float32, dev, 4, scale=50.0)
    assert torch.equal(generic_labels(b, r, 0.0, impl="triton"), b.argmax(-1))
    assert torch.equal(generic_labels(b, r, 0, impl="triton"), b.argmax(-1))  # an int alpha is fine
    assert torch.equal(generic_labels(b, b - 1.0, 5.0, impl="triton"), b.argmax(-1))  # reinforcement lowered every logit


def test_labels_alpha_pushes_raised_logits_down(dev):
    b = torch.tensor([[3.0, 2.0, 1.0, 1.5, 2.4]], device=dev)
    r = torch.tensor([[5.0, 2.5, 0.5, 1.4, 2.3]], device=dev)
    assert [generic_labels(b, r, a, impl="triton").item() for a in (0.0, 0.2, 0.5, 1.0)] == [0, 0, 4, 4]
    torch.testing.assert_close(generic_logits(b, r, 1.0), torch.tensor([[1.0, 1.5, 1.0, 1.5, 2.4]], device=dev))


def test_labels_nan_and_inf(dev, small_tiles):
    "Infinities and NaN follow torch.argmax of the reference (NaN is the maximum, first NaN wins)."
    rows_b = [[1.0, NAN, 3.0, NAN], [-INF] * 4, [2.0, 5.0, 5.0, 1.0], [-INF, 1.0, -INF, INF], [INF, 1.0, INF, 0.0],
              [-INF, -INF, 0.0, -1.0]]
    rows_r = [[0.0] * 4, [-INF, -INF, 0.0, 0.0], [0.0] * 4, [-INF, 0.0, -INF, INF], [0.0, 0.0, INF, 0.0],
              [-INF, 0.0, -INF, -1.0]]
    for dtype in (torch.float32, torch.float64):
        b, r = torch.tensor(rows_b, dtype=dtype, device=dev), torch.tensor(rows_r, dtype=dtype, device=dev)
        for alpha in (0.0, 1.0):
            check_labels(b, r, alpha)
    g = torch.Generator().manual_seed(7)  # NaN deep inside a long row, in a later tile
    b = torch.randn(4, 500, generator=g, dtype=torch.float64)
    b[0, 300], b[1, 499], b[2, 70], b[2, 20] = NAN, NAN, NAN, INF
    b[3, :] = -INF
    check_labels(b.to(dev), b.to(dev) + 0.5, 1.0)


def test_labels_non_contiguous_and_shapes(dev):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 3, 80, generator=g, dtype=torch.float64).to(dev)
    b, r = base.transpose(0, 1)[..., :40], base.flip(0).transpose(0, 1)[..., ::2]
    assert not b.is_contiguous() and r.stride(-1) == 2
    check_labels(b, r, 1.0)
    out = check_labels(base[0, 0], base[1, 1], 1.0)  # unbatched [V] -> 0-dim
    assert out.shape == ()
    for shape in [(0, 10), (2, 0, 10)]:  # zero rows
        x = torch.randn(shape, device=dev)
        check_labels(x, x, 1.0)


def test_labels_inputs_requiring_grad(dev):
    b = randn((4, 33), torch.float32, dev, 5).requires_grad_()
    r = randn((4, 33), torch.float32, dev, 6).requires_grad_()
    out = generic_labels(b, r, 1.0, impl="triton")
    assert not out.requires_grad and torch.equal(out, generic_labels_ref(b.detach(), r.detach(), 1.0))


def test_labels_auto_and_torch_on_cpu_run_the_reference():
    b, r = randn((3, 5, 1000), torch.float32, "cpu", 0), randn((3, 5, 1000), torch.float32, "cpu", 1)
    assert torch.equal(generic_labels(b, r, 0.7), generic_labels_ref(b, r, 0.7))
    assert torch.equal(generic_labels(b, r, 0.7, impl="torch"), (b - 0.7 * torch.relu(r - b)).argmax(-1))
    assert generic_labels_ref(b.bfloat16(), r.bfloat16(), 1.0).dtype == torch.int64


# ---------------------------------------------------------------- kl_div

def check_kl(x, y, reduction, **tol):
    out = grads(lambda a, b: kl_div(a, b, reduction, impl="triton"), [x, y])
    ref = grads(lambda a, b: kl_div_ref(a, b, reduction), [x, y])
    errs = {}
    for name, o, r in zip(("kl", "dp", "dq"), out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, (name, o.dtype, r.dtype, o.shape, r.shape)
        torch.testing.assert_close(o, r, equal_nan=True, **(tol or TOL[x.dtype]), msg=lambda m: f"{name}: {m}")
        errs[name] = max_abs_err(o, r)
    return errs


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_parity(shape, dtype, reduction, dev):
    check_kl(randn(shape, dtype, dev, 0), randn(shape, dtype, dev, 1), reduction)


def test_kl_vocab_tiles(dev, small_tiles):
    "Many tiles per row and several programs; the reduction happens outside the kernel, so 'none' covers the kernels."
    for shape in [(2, 1000), (7, 129), (3, 64), (9, 1)]:
        check_kl(randn(shape, torch.float64, dev, 2), randn(shape, torch.float64, dev, 3), "none")
    check_kl(randn((3, 300), torch.float32, dev, 2), randn((3, 300), torch.float32, dev, 3), "none")
    for red in ("mean", "sum"):
        check_kl(randn((7, 129), torch.float64, dev, 4), randn((7, 129), torch.float64, dev, 5), red)


def test_kl_identical_logits_is_zero(dev, small_tiles):
    for dtype in (torch.float32, torch.float64):
        x = randn((6, 300), dtype, dev, 4, scale=5.0).requires_grad_()
        y = x.detach().clone().requires_grad_()
        kl = kl_div(x, y, impl="triton")
        assert torch.equal(kl, torch.zeros_like(kl))
        kl.backward(torch.ones_like(kl))
        assert not x.grad.any() and not y.grad.any()
        assert kl_div(x, y, "mean", impl="triton").item() == 0.0


def test_kl_reference_matches_torch():
    x, y = randn((3, 5, 17), torch.float64, "cpu", 5), randn((3, 5, 17), torch.float64, "cpu", 6)
    want = F.kl_div(F.log_softmax(y, -1), F.log_softmax(x, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_div_ref(x, y), want)
    torch.testing.assert_close(kl_div_ref(x, y, "mean"), want.mean())
    torch.testing.assert_close(kl_div_ref(x, y, "sum"), want.sum())
    assert kl_div_ref(x.bfloat16(), y.bfloat16()).dtype == torch.bfloat16


def test_kl_masked_vocab_and_large_logits(dev, small_tiles):
    "-inf in both inputs (masked vocabulary, whole tiles of it) stays finite; -inf in q where p > 0 gives +inf."
    x, y = randn((6, 300), torch.float64, dev, 7), randn((6, 300), torch.float64, dev, 8)
    x[:, :130] = -INF; y[:, :130] = -INF  # two whole tiles and a bit masked in both
    y[0, 140:150] = -INF  # p = 0 there? no: x finite -> KL(row 0) = +inf
    x[1, 200:] = -INF  # p = 0 where q > 0: fine
    out = kl_div(x, y, impl="triton")
    assert out[0].item() == INF and out[1:].isfinite().all()
    torch.testing.assert_close(out, kl_div_ref(x, y))
    check_kl(x[1:], y[1:], "none")
    check_kl(x[1:], y[1:], "mean")
    xb, yb = randn((6, 300), torch.float32, dev, 9, scale=1e3), randn((6, 300), torch.float32, dev, 10, scale=1e3)
    for red in REDUCTIONS: check_kl(xb, yb, red, atol=1e-2, rtol=1e-5)


def test_kl_one_sided_gradients(dev, monkeypatch):
    "Only the gradient autograd needs is computed (GradDiff-KL: P is a frozen reference model)."
    x, y = randn((4, 6, 70), torch.float64, dev, 11), randn((4, 6, 70), torch.float64, dev, 12)
    for need in ((False, True), (True, False)):
        xx, yy = x.clone().requires_grad_(need[0]), y.clone().requires_grad_(need[1])
        xr, yr = x.clone().requires_grad_(need[0]), y.clone().requires_grad_(need[1])
        kl_div(xx, yy, "sum", impl="triton").backward()
        kl_div_ref(xr, yr, "sum").backward()
        for a, b in ((xx, xr), (yy, yr)):
            assert (a.grad is None) == (not a.requires_grad)
            if a.grad is not None: torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])
    seen, bwd = [], ul.kl_div_bwd
    monkeypatch.setattr(ul, "kl_div_bwd", lambda *a, **k: (seen.append(a[6:8]), bwd(*a, **k))[1])
    kl_div(x, y.clone().requires_grad_(), impl="triton").sum().backward()
    assert seen == [(False, True)]  # need_dp, need_dq


def test_kl_non_contiguous(dev):
    g = torch.Generator().manual_seed(13)
    base = torch.randn(5, 3, 80, generator=g, dtype=torch.float64).to(dev)
    x, y = base.transpose(0, 1)[..., :40], base.flip(0).transpose(0, 1)[..., ::2]
    assert not x.is_contiguous() and y.stride(-1) == 2
    for red in REDUCTIONS: check_kl(x, y, red)
    check_kl(base[0, 0], base[1, 1], "none")  # unbatched [V] -> 0-dim


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10)])
def test_kl_zero_rows(shape, reduction, dev):
    x = torch.randn(shape, device=dev, requires_grad=True)
    y = torch.randn(shape, device=dev, requires_grad=True)
    out, ref = kl_div(x, y, reduction, impl="triton"), kl_div_ref(x, y, reduction)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, equal_nan=True)  # none: empty, sum: 0, mean: nan
    out.sum().backward()
    assert x.grad.shape == x.shape and y.grad.shape == y.shape


def test_kl_gradcheck(dev):
    x = randn((3, 7), torch.float64, dev, 14).requires_grad_()
    y = randn((3, 7), torch.float64, dev, 15).requires_grad_()
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a, b: kl_div(a, b, red, impl="triton"), (x, y), fast_mode=True)


def test_kl_auto_and_torch_on_cpu_run_the_reference():
    x, y = randn((3, 5, 100), torch.float32, "cpu", 0), randn((3, 5, 100), torch.float32, "cpu", 1)
    for red in REDUCTIONS:
        assert torch.equal(kl_div(x, y, red), kl_div_ref(x, y, red))
        assert torch.equal(kl_div(x, y, red, impl="torch"), kl_div_ref(x, y, red))


# ---------------------------------------------------------------- errors

X = torch.randn(4, 10)
ERRORS = [
    (lambda: generic_labels(X, X, alpha=-0.5), ValueError, "`alpha`: expected a finite real number >= 0 (a Python float), got -0.5"),
    (lambda: generic_labels(X, X, alpha=math.inf), ValueError, "`alpha`: expected a finite real number >= 0"),
    (lambda: generic_labels(X, X, alpha=math.nan), ValueError, "`alpha`: expected a finite real number >= 0"),
    (lambda: generic_labels(X, X, alpha=True), ValueError, "`alpha`: expected a finite real number >= 0"),
    (lambda: generic_labels(X, X, alpha=torch.tensor(1.0)), ValueError, "`alpha`: expected a finite real number >= 0"),
    (lambda: generic_labels(X, X[:, :9]), ValueError, "`reinforced_logits`: expected shape (4, 10) (the shape of `base_logits`), got (4, 9)"),
    (lambda: generic_labels(X, X.double()), ValueError, "`reinforced_logits`: expected dtype torch.float32 (the dtype of `base_logits`)"),
    (lambda: generic_labels(X.long(), X), TypeError, "`base_logits`: expected dtype"),
    (lambda: generic_labels(X, X.long()), TypeError, "`reinforced_logits`: expected dtype"),
    (lambda: generic_labels(X, [1.0]), TypeError, "`reinforced_logits`: expected a torch.Tensor"),
    (lambda: generic_labels(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "`base_logits`: expected at least 1 dimension"),
    (lambda: generic_labels(torch.randn(3, 0), torch.randn(3, 0)), ValueError, "`base_logits`: expected a vocabulary (last) dimension of size >= 1"),
    (lambda: generic_labels(X, X.to("meta")), ValueError, "`reinforced_logits` is on meta but `base_logits` is on cpu"),
    (lambda: generic_labels(X, X, impl="cuda"), ValueError, "`impl`: expected one of 'auto', 'triton', 'torch'"),
    (lambda: kl_div(X, X, reduction="batchmean"), ValueError, "`reduction`: expected one of 'none', 'mean', 'sum'"),
    (lambda: kl_div(X, X.T), ValueError, "`q_logits`: expected shape (4, 10) (the shape of `p_logits`), got (10, 4)"),
    (lambda: kl_div(X, X.double()), ValueError, "`q_logits`: expected dtype torch.float32 (the dtype of `p_logits`)"),
    (lambda: kl_div(X.long(), X), TypeError, "`p_logits`: expected dtype"),
    (lambda: kl_div(X, None), TypeError, "`q_logits`: expected a torch.Tensor"),
    (lambda: kl_div(torch.randn(2, 0), torch.randn(2, 0)), ValueError, "`p_logits`: expected a vocabulary (last) dimension of size >= 1"),
    (lambda: kl_div(X, X.to("meta")), ValueError, "`q_logits` is on meta but `p_logits` is on cpu"),
    (lambda: kl_div(X, X, impl="gpu"), ValueError, "`impl`"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    assert_raises_with(*ERRORS[i])


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if not HAS_TRITON: pytest.skip("without triton the error is about the missing package")
    monkeypatch.setattr(ul, "interpreting", lambda kernel=None: False)
    monkeypatch.setattr("trainlab.kernels.utils.interpreting", lambda kernel=None: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        generic_labels(X, X, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kl_div(X, X, impl="triton")


# ---------------------------------------------------------------- GPU, low precision

def _need_compiled_gpu():
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("low-precision checks need compiled kernels: run with TRITON_INTERPRET=0")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 32000), (7, 129), (3, 5, 1000), (1, 1), (64, 128256)])
def test_kl_low_precision_gpu(shape, dtype, reduction):
    _need_compiled_gpu()
    x, y = randn(shape, torch.float32, "cuda", 0), randn(shape, torch.float32, "cuda", 1)
    out = grads(lambda a, b: kl_div(a, b, reduction, impl="triton"), [x.to(dtype), y.to(dtype)])
    ref = grads(lambda a, b: kl_div_ref(a, b, reduction), [x, y])
    base = grads(lambda a, b: kl_div_ref(a, b, reduction, upcast=False), [x.to(dtype), y.to(dtype)])
    for name, o, r, b in zip(("kl", "dp", "dq"), out, ref, base):
        assert o.dtype == dtype
        assert_close_3way(o, r, b, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 32000), (7, 129), (3, 5, 1000), (1, 1), (64, 128256)])
def test_labels_gpu(shape, dtype):
    "Compiled kernels may fuse the multiply-add (FMA): compare where the fp32 top-2 margin is clear of rounding."
    _need_compiled_gpu()
    b, r = randn(shape, torch.float32, "cuda", 0).to(dtype), randn(shape, torch.float32, "cuda", 1).to(dtype)
    out, ref = generic_labels(b, r, 1.0, impl="triton"), generic_labels_ref(b, r, 1.0)
    v = generic_logits(b.float(), r.float(), 1.0)
    top2 = v.topk(min(2, shape[-1]), -1).values
    clear = (top2[..., 0] - top2[..., -1]) > 1e-4 if shape[-1] > 1 else torch.ones_like(out, dtype=torch.bool)
    assert torch.equal(out[clear], ref[clear])
    assert (v.gather(-1, out.unsqueeze(-1)).squeeze(-1) >= top2[..., 0] - 1e-4).all()  # never far from the max
    t = grid(shape, dtype, "cuda", 2)  # exact small integers: no rounding anywhere, ties everywhere
    assert torch.equal(generic_labels(t, t.flip(-1), 1.0, impl="triton"), generic_labels_ref(t, t.flip(-1), 1.0))


@pytest.mark.gpu
def test_labels_memory_gpu():
    "The kernel allocates only the labels; the PyTorch expression materialises [N, V] temporaries."
    _need_compiled_gpu()
    N, V = 2048, 128256
    b, r = randn((N, V), torch.float32, "cuda", 0).bfloat16(), randn((N, V), torch.float32, "cuda", 1).bfloat16()
    generic_labels(b, r, 1.0, impl="triton")  # compile first
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
    generic_labels(b, r, 1.0, impl="triton"); torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 1 << 20, extra  # 16 KB of labels (+ allocator rounding)
