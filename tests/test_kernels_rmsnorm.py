"""RMSNorm kernel vs. its reference (trainlab.kernels.norm).

CPU: run with TRITON_INTERPRET=1 (tests/conftest.py sets it) so impl="triton" runs the kernels in the interpreter.
GPU: `TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_rmsnorm.py` adds the bf16/fp16 three-way checks.
"""
import pytest
import torch

from trainlab.kernels import RMSNorm, rmsnorm, rmsnorm_ref
from trainlab.kernels import norm as norm_mod
from trainlab.kernels.utils import assert_close_3way, interpreting, max_abs_err
from kernel_checks import assert_raises_with

# Stated tolerances. Observed max abs errors at these sizes: fp64 <= 4e-15, fp32 <= 1.2e-6
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
SHAPES = [(1, 1), (7, 129), (3, 5, 1000), (4, 2, 3, 17), (2, 5000)]


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, w, dy)]


def fwd_bwd(f, x, w, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = f(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def check_parity(x, w, dy, eps=1e-6, **tol):
    out = fwd_bwd(lambda a, b: rmsnorm(a, b, eps, impl="triton"), x, w, dy)
    ref = fwd_bwd(lambda a, b: rmsnorm_ref(a, b, eps), x, w, dy)
    for name, o, r in zip(("y", "dx", "dw"), out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, **(tol or TOL[x.dtype]), msg=lambda m: f"{name}: {m}")
    return {n: max_abs_err(o, r) for n, o, r in zip(("y", "dx", "dw"), out, ref)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity(shape, dtype, dev):
    check_parity(*make(shape, dtype, dev))


def test_column_tiles_and_partial_sums(dev, monkeypatch):
    "Shrunk block limits: rows loop over 64-wide tiles (N not a multiple), several row blocks and backward programs."
    for key in ("interpret", "gpu"):
        monkeypatch.setitem(norm_mod._LIMITS, key, dict(max_block_n=64, max_elems=128, bwd_programs=2))
    assert norm_mod._settings(11, 300, True)[:3] == (2, 64, False)
    for shape in [(11, 300), (5, 64), (3, 1, 65), (9, 40)]:
        check_parity(*make(shape, torch.float64, dev))
    check_parity(*make((11, 300), torch.float32, dev))


def test_eps_values(dev):
    x, w, dy = make((6, 33), torch.float64, dev)
    for eps in (0.0, 1e-6, 0.5, 10):
        check_parity(x, w, dy, eps=eps)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0, 1)])
def test_zero_rows(shape, dev):
    x = torch.randn(shape, device=dev, requires_grad=True)
    w = torch.randn(shape[-1], device=dev, requires_grad=True)
    y = rmsnorm(x, w, impl="triton")
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_non_contiguous(dev):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 3, 66, generator=g, dtype=torch.float64).to(dev)
    wbase = torch.randn(66, generator=g, dtype=torch.float64).to(dev)
    dybase = torch.randn(3, 5, 66, generator=g, dtype=torch.float64).to(dev)
    x = base.transpose(0, 1)  # rows not contiguous
    assert not x.is_contiguous()
    check_parity(x, torch.ones(66, dtype=torch.float64, device=dev), dybase.transpose(0, 1).contiguous().transpose(0, 1))
    x2, w2, dy2 = base[..., ::2], wbase[::2], dybase.transpose(0, 1)[..., ::2]  # stride 2 along the normalised dim
    assert x2.stride(-1) == 2 and w2.stride(0) == 2
    check_parity(x2, w2, dy2)
    # an expanded (stride-0) upstream gradient, as from y.sum()
    x3 = x2.detach().requires_grad_()
    rmsnorm(x3, w2, impl="triton").sum().backward()
    x4 = x2.detach().requires_grad_()
    rmsnorm_ref(x4, w2).sum().backward()
    torch.testing.assert_close(x3.grad, x4.grad, **TOL[torch.float64])


def test_mixed_dtypes(dev):
    "fp32 x with an fp64 weight computes in fp64 and returns fp32, like the reference."
    x, _, dy = make((4, 20), torch.float32, dev)
    w = make((4, 20), torch.float64, dev)[1]
    check_parity(x, w, dy, atol=1e-6, rtol=1e-6)


def test_gradcheck(dev):
    x, w, _ = make((2, 3, 5), torch.float64, dev)
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rmsnorm(a, b, impl="triton"), (x, w), fast_mode=True)


def test_auto_and_torch_on_cpu_run_the_reference():
    x, w, _ = make((7, 129), torch.float32, "cpu")
    assert torch.equal(rmsnorm(x, w), rmsnorm_ref(x, w))
    assert torch.equal(rmsnorm(x, w, impl="torch"), rmsnorm_ref(x, w))


def test_reference_properties():
    x = torch.randn(5, 16, dtype=torch.float64)
    y = rmsnorm_ref(x, torch.ones(16, dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(rmsnorm_ref(3 * x, torch.ones(16, dtype=torch.float64), eps=0.0), y)
    xb = x.to(torch.bfloat16)
    assert rmsnorm_ref(xb, torch.ones(16)).dtype == torch.bfloat16
    assert rmsnorm_ref(xb, torch.ones(16), upcast=False).dtype == torch.bfloat16


def test_module(dev):
    m = RMSNorm(16, impl="triton").to(dev)
    assert isinstance(m.weight, torch.nn.Parameter) and torch.equal(m.weight.detach(), torch.ones(16, device=dev))
    assert "16, eps=1e-06, impl='triton'" in repr(m)
    x = torch.randn(3, 4, 16, device=dev, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, rmsnorm_ref(x, m.weight), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.shape == (16,)
    assert RMSNorm(8, dtype=torch.float64).weight.dtype == torch.float64


X, W = torch.randn(4, 8), torch.ones(8)
ERRORS = [
    (lambda: rmsnorm(X, torch.ones(7)), ValueError, "`weight`: expected shape (8,)"),
    (lambda: rmsnorm(X, torch.ones(1, 8)), ValueError, "`weight`: expected 1 dimension"),
    (lambda: rmsnorm(X.long(), W), TypeError, "`x`: expected dtype"),
    (lambda: rmsnorm(X, W.int()), TypeError, "`weight`: expected dtype"),
    (lambda: rmsnorm(X.numpy(), W), TypeError, "`x`: expected a torch.Tensor"),
    (lambda: rmsnorm(torch.tensor(1.0), torch.ones(1)), ValueError, "`x`: expected at least 1 dimension"),
    (lambda: rmsnorm(torch.ones(3, 0), torch.ones(0)), ValueError, "`x`: expected a last dimension of size >= 1"),
    (lambda: rmsnorm(X, W.to("meta")), ValueError, "`weight` is on meta but `x` is on cpu"),
    (lambda: rmsnorm(X, W, eps=-1e-6), ValueError, "`eps`: expected a finite number >= 0"),
    (lambda: rmsnorm(X, W, eps=float("nan")), ValueError, "`eps`"),
    (lambda: rmsnorm(X, W, impl="cuda"), ValueError, "`impl`: expected one of 'auto', 'triton', 'torch'"),
    (lambda: RMSNorm(0), ValueError, "`dim`: expected a positive int"),
    (lambda: RMSNorm(8, impl="fast"), ValueError, "`impl`"),
    (lambda: RMSNorm(8, eps=-1), ValueError, "`eps`"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    assert_raises_with(*ERRORS[i])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (7, 129), (3, 5, 1000), (1, 1), (33, 20000)])
def test_low_precision_gpu(shape, dtype):
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("low-precision checks need compiled kernels: run with TRITON_INTERPRET=0")
    x, w, dy = make(shape, torch.float32, "cuda")
    x, w, dy = x.to(dtype), w.to(dtype), dy.to(dtype)
    out = fwd_bwd(lambda a, b: rmsnorm(a, b, impl="triton"), x, w, dy)
    ref = fwd_bwd(rmsnorm_ref, x.float(), w.float(), dy.float())
    base = fwd_bwd(lambda a, b: rmsnorm_ref(a, b, upcast=False), x, w, dy)
    for name, o, r, b in zip(("y", "dx", "dw"), out, ref, base):
        assert o.dtype == dtype
        assert_close_3way(o, r, b, name=name)
