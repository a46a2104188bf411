"""Helpers shared by the kernel test files (imported as a plain module: pytest puts tests/ on sys.path)."""
import pytest
import torch


def upstream(y, seed=1):
    "A non-trivial upstream gradient (scalar for reductions)."
    if y.ndim == 0: return torch.tensor(0.7, dtype=y.dtype, device=y.device)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)


def grads(f, inputs):
    "The output of `f(*inputs)` followed by its gradients w.r.t. every input, under `upstream`."
    inputs = [a.detach().requires_grad_() for a in inputs]
    y = f(*inputs)
    return (y, *torch.autograd.grad(y, inputs, upstream(y)))


def assert_raises_with(fn, exc, msg):
    "Calling `fn()` raises `exc` whose message contains `msg` (the tables of bad inputs in each kernel test)."
    with pytest.raises(exc) as e:
        fn()
    assert msg in str(e.value)
