"""Cross-entropy and chunked linear cross-entropy kernels vs. their references (trainlab.kernels.xent).

CPU: run with TRITON_INTERPRET=1 (tests/conftest.py sets it) so impl="triton" runs the kernels in the interpreter.
GPU: `TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_cross_entropy.py` adds the bf16/fp16 three-way checks.
"""
import pytest
import torch

from trainlab.kernels import cross_entropy, cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_ref
from trainlab.kernels import xent as xent_mod
from trainlab.kernels.utils import assert_close_3way, cdiv, interpreting, max_abs_err
from trainlab.kernels.xent import GroupedLoss, linear_ce_chunk_size
from kernel_checks import assert_raises_with, grads, upstream

# Stated tolerances. Observed max abs errors: fp64 <= 1.5e-14; fp32 <= 8e-6 on summed losses, <= 3e-6 elsewhere
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
SHAPES = [(1, 1), (7, 129), (3, 5, 1000), (6, 2), (2, 3, 4, 33)]  # (..., V); 129, 1000, 33 are not tile multiples
REDUCTIONS = ["mean", "sum", "none"]



def make_ce(shape, dtype, device, p_ignore=0.3, ignore_index=-100, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)
    t = torch.randint(0, shape[-1], shape[:-1], generator=g)
    t[torch.rand(shape[:-1], generator=g) < p_ignore] = ignore_index
    return x, t.to(device)


def compare(out, ref, names, **tol):
    errs = {}
    for name, o, r in zip(names, out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, (name, o.dtype, r.dtype, o.shape, r.shape)
        torch.testing.assert_close(o, r, equal_nan=True, **tol, msg=lambda m: f"{name}: {m}")
        errs[name] = max_abs_err(o, r)
    return errs


def check_ce(x, t, reduction, ignore_index=-100, **tol):
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    out = grads(lambda a: cross_entropy(a, t, impl="triton", **kw), [x])
    ref = grads(lambda a: cross_entropy_ref(a, t, **kw), [x])
    return compare(out, ref, ("loss", "dlogits"), **(tol or TOL[x.dtype]))


# ---------------------------------------------------------------- cross_entropy

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_ce_parity(shape, dtype, reduction, dev):
    check_ce(*make_ce(shape, dtype, dev), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_vocab_tiles(reduction, dev, monkeypatch):
    "Shrunk limits: 64-wide vocabulary tiles (V not a multiple), several rows per program, many programs."
    for key in ("interpret", "gpu"):
        monkeypatch.setitem(xent_mod._LIMITS, key, dict(max_block_v=64, max_elems=128))
    assert xent_mod._settings(15, 1000, True)[:2] == (2, 64)
    for shape in [(3, 5, 1000), (7, 129), (5, 64), (9, 1)]:
        check_ce(*make_ce(shape, torch.float64, dev), reduction)
    check_ce(*make_ce((3, 5, 1000), torch.float32, dev), reduction)


def test_ce_masked_vocab_and_large_logits(dev, monkeypatch):
    "-inf logits filling whole tiles (online lse must not produce nan) and large-magnitude logits."
    for key in ("interpret", "gpu"):
        monkeypatch.setitem(xent_mod._LIMITS, key, dict(max_block_v=64, max_elems=128))
    x, t = make_ce((6, 300), torch.float64, dev, p_ignore=0.0)
    x[:, :150] = float("-inf")  # the first two tiles are all -inf
    t = 150 + t % 150
    for red in REDUCTIONS: check_ce(x, t, red)
    x, t = make_ce((6, 300), torch.float32, dev, scale=1e4)
    for red in REDUCTIONS: check_ce(x, t, red, atol=1e-2, rtol=1e-5)


@pytest.mark.parametrize("ignore_index", [1, 7, -1])
def test_ce_custom_ignore_index(ignore_index, dev):
    "A non-default ignore_index, also one inside [0, V)."
    for red in REDUCTIONS:
        check_ce(*make_ce((4, 6, 7), torch.float64, dev, ignore_index=ignore_index), red, ignore_index=ignore_index)


def test_ce_fully_ignored_rows(dev):
    "Whole sequences ignored inside a batch."
    x, t = make_ce((3, 5, 50), torch.float64, dev, p_ignore=0.0)
    t[1] = -100
    t[2, 3:] = -100
    for red in REDUCTIONS: check_ce(x, t, red)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_all_ignored(reduction, dev):
    x, _ = make_ce((4, 3, 10), torch.float32, dev)
    t = torch.full((4, 3), -100, device=dev)
    x.requires_grad_()
    y = cross_entropy(x, t, reduction=reduction, impl="triton")
    y.backward(torch.ones_like(y))
    if reduction == "mean": assert y.isnan()  # like torch: 0 / 0
    else: assert (y == 0).all()
    assert torch.equal(x.grad, torch.zeros_like(x))
    check_ce(x.detach(), t, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10)])
def test_ce_zero_rows(shape, reduction, dev):
    x = torch.randn(shape, device=dev, requires_grad=True)
    t = torch.zeros(shape[:-1], dtype=torch.long, device=dev)
    y = cross_entropy(x, t, reduction=reduction, impl="triton")
    ref = cross_entropy_ref(x, t, reduction=reduction)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, equal_nan=True)  # mean: nan, sum: 0, none: empty
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_ce_non_contiguous(dev):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 3, 80, generator=g, dtype=torch.float64).to(dev)
    t = torch.randint(0, 40, (3, 5), generator=g).to(dev)
    x = base.transpose(0, 1)[..., :40]  # rows not contiguous, a slice of the class dim
    assert not x.is_contiguous()
    for red in REDUCTIONS: check_ce(x, t, red)
    x2 = base.transpose(0, 1)[..., ::2]  # stride 2 along the class dim
    assert x2.stride(-1) == 2
    for red in REDUCTIONS: check_ce(x2, t, red)
    tb = torch.randint(0, 40, (5, 3), generator=g).to(dev).T  # non-contiguous targets
    for red in REDUCTIONS: check_ce(x2, tb, red)


def test_ce_target_dtypes_and_1d(dev):
    x, t = make_ce((6, 11), torch.float64, dev)
    for dt in (torch.int32, torch.int16):
        for red in REDUCTIONS: check_ce(x, t.to(dt), red)
    for red in REDUCTIONS: check_ce(x[0], torch.tensor(3, device=dev), red)  # unbatched: logits [V], scalar target


def test_ce_gradcheck(dev):
    x, t = make_ce((3, 7), torch.float64, dev, p_ignore=0.0)
    t[1] = -100
    x.requires_grad_()
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t, reduction=red, impl="triton"), (x,), fast_mode=True)


def test_ce_auto_and_torch_on_cpu_run_the_reference():
    x, t = make_ce((3, 5, 1000), torch.float32, "cpu")
    for red in REDUCTIONS:
        assert torch.equal(cross_entropy(x, t, reduction=red), cross_entropy_ref(x, t, reduction=red))
        assert torch.equal(cross_entropy(x, t, reduction=red, impl="torch"), cross_entropy_ref(x, t, reduction=red))


def test_ce_reference_matches_torch():
    x, t = make_ce((3, 5, 17), torch.float32, "cpu")
    torch.testing.assert_close(cross_entropy_ref(x, t), torch.nn.functional.cross_entropy(x.permute(0, 2, 1), t))
    assert cross_entropy_ref(x.bfloat16(), t).dtype == torch.bfloat16
    assert cross_entropy_ref(x, t, reduction="none").shape == (3, 5)


# ---------------------------------------------------------------- linear_cross_entropy

def make_lce(lead, V, H, dtype, device, p_ignore=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(device, dtype)
    w = (0.5 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(device, dtype)
    t = torch.randint(0, V, lead, generator=g)
    t[torch.rand(lead, generator=g) < p_ignore] = -100
    return h, w, t.to(device)


def check_lce(h, w, t, reduction, chunk=None, ignore_index=-100, **tol):
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    out = grads(lambda a, b: linear_cross_entropy(a, b, t, impl="triton", _chunk_size=chunk, **kw), [h, w])
    ref = grads(lambda a, b: linear_cross_entropy_ref(a, b, t, **kw), [h, w])
    return compare(out, ref, ("loss", "dhidden", "dweight"), **(tol or TOL[h.dtype]))


LCE_CASES = [  # (leading shape, V, H, chunk): None = Liger's rule
    ((3, 5), 100, 16, None),  # rule: ceil(100/16) = 7 -> chunk next_pow2(ceil(15/7)) = 4: four chunks
    ((7,), 129, 8, 3),  # forced: three chunks, the last one short
    ((1,), 1, 1, None),
    ((2, 3, 4), 50, 32, None),  # rule: chunk 16 of 24 tokens: two chunks
    ((2, 9), 33, 40, 1),  # one token per chunk
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", LCE_CASES)
def test_lce_parity(case, dtype, reduction, dev):
    lead, V, H, chunk = case
    check_lce(*make_lce(lead, V, H, dtype, dev), reduction, chunk=chunk)


def test_lce_chunk_rule():
    assert linear_ce_chunk_size(16384, 32768, 4096) == 2048  # Liger's worked example
    assert linear_ce_chunk_size(15, 100, 16) == 4
    assert linear_ce_chunk_size(24, 50, 32) == 16
    assert linear_ce_chunk_size(0, 10, 10) == 1
    assert linear_ce_chunk_size(4096, 256, 4096) == 4096  # V <= H: a single chunk


@pytest.mark.parametrize("chunk", [None, 3])
def test_lce_never_materialises_full_logits(chunk, dev, monkeypatch):
    "Spy on the CE launchers: each sees at most `chunk` rows of logits, one call per chunk."
    seen = {"fwd": [], "bwd": []}
    import trainlab.kernels.linear_xent as lxent_mod  # the chunked loss calls the launchers it imported
    fwd, bwd = lxent_mod.ce_fwd, lxent_mod.ce_bwd
    monkeypatch.setattr(lxent_mod, "ce_fwd", lambda z, *a, **k: (seen["fwd"].append(tuple(z.shape)), fwd(z, *a, **k))[1])
    monkeypatch.setattr(lxent_mod, "ce_bwd", lambda z, *a, **k: (seen["bwd"].append(tuple(z.shape)), bwd(z, *a, **k))[1])
    h, w, t = make_lce((3, 5), 100, 16, torch.float64, dev)
    check_lce(h, w, t, "mean", chunk=chunk)
    c = chunk or linear_ce_chunk_size(15, 100, 16)
    for k in ("fwd", "bwd"):
        assert len(seen[k]) == cdiv(15, c), seen
        assert all(n <= c and v == 100 for n, v in seen[k]), seen


def test_lce_frozen_inputs(dev):
    "Gradient for only one of hidden / weight (a frozen head, or frozen features)."
    h, w, t = make_lce((4, 6), 40, 8, torch.float64, dev)
    for need in ((True, False), (False, True)):
        hh, ww = h.clone().requires_grad_(need[0]), w.clone().requires_grad_(need[1])
        hr, wr = h.clone().requires_grad_(need[0]), w.clone().requires_grad_(need[1])
        linear_cross_entropy(hh, ww, t, impl="triton", _chunk_size=5).backward()
        linear_cross_entropy_ref(hr, wr, t).backward()
        for a, b in ((hh, hr), (ww, wr)):
            assert (a.grad is None) == (not a.requires_grad)
            if a.grad is not None: torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])


def test_lce_ignored_and_empty(dev):
    h, w, t = make_lce((3, 5), 30, 8, torch.float64, dev, p_ignore=0.0)
    t[1] = -100  # a fully ignored sequence
    for red in REDUCTIONS: check_lce(h, w, t, red, chunk=4)
    t_all = torch.full_like(t, -100)
    for red in REDUCTIONS: check_lce(h, w, t_all, red, chunk=4)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, t_all, impl="triton")
    loss.backward()
    assert loss.isnan() and not hh.grad.any() and not ww.grad.any()
    for red in REDUCTIONS:  # zero tokens
        h0 = torch.randn(0, 8, dtype=torch.float64, device=dev, requires_grad=True)
        w0 = w.clone().requires_grad_()
        t0 = torch.zeros(0, dtype=torch.long, device=dev)
        y = linear_cross_entropy(h0, w0, t0, reduction=red, impl="triton")
        torch.testing.assert_close(y, linear_cross_entropy_ref(h0, w0, t0, reduction=red), equal_nan=True)
        y.sum().backward()
        assert h0.grad.shape == h0.shape and torch.equal(w0.grad, torch.zeros_like(w0))


def test_lce_non_contiguous(dev):
    g = torch.Generator().manual_seed(5)
    hb = torch.randn(5, 3, 12, generator=g, dtype=torch.float64).to(dev)
    wb = torch.randn(12, 40, generator=g, dtype=torch.float64).to(dev)
    h, w = hb.transpose(0, 1), wb.T  # [3, 5, 12], [40, 12], both non-contiguous
    t = torch.randint(0, 40, (3, 5), generator=g).to(dev)
    assert not h.is_contiguous() and not w.is_contiguous()
    for red in REDUCTIONS: check_lce(h, w, t, red, chunk=4)


def test_lce_gradcheck(dev):
    h, w, t = make_lce((2, 3), 6, 4, torch.float64, dev, p_ignore=0.0)
    t[0, 1] = -100
    h.requires_grad_(), w.requires_grad_()
    for red in ("mean", "none"):
        f = lambda a, b: linear_cross_entropy(a, b, t, reduction=red, impl="triton", _chunk_size=2)
        assert torch.autograd.gradcheck(f, (h, w), fast_mode=True)


def test_lce_auto_on_cpu_runs_the_reference():
    h, w, t = make_lce((3, 5), 100, 16, torch.float32, "cpu")
    for red in REDUCTIONS:
        assert torch.equal(linear_cross_entropy(h, w, t, reduction=red), linear_cross_entropy_ref(h, w, t, reduction=red))


# ---------------------------------------------------------------- per-group loss sums (group_ids, num_groups)

@pytest.fixture(params=["partials", "atomics"])
def group_path(request, monkeypatch):
    "Both in-kernel group reductions: per-program partial rows (few groups) and per-row atomic adds (many groups)."
    if request.param == "atomics":
        for key in ("interpret", "gpu"):
            monkeypatch.setitem(xent_mod._LIMITS, key, dict(xent_mod._LIMITS[key], max_group_tile=0))
    return request.param


def make_groups(shape, num_groups, device, seed=2):
    "Group ids in [0, num_groups - 1): the last group never occurs."
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(1, num_groups - 1), shape, generator=g).to(device)


def group_ref(loss_rows, t, gid, num_groups, ignore_index=-100):
    "A loop over groups on the reference's per-row losses (independent of scatter_add/bincount)."
    valid = t != ignore_index
    sums = torch.stack([loss_rows[(gid == k) & valid].double().sum() for k in range(num_groups)])
    counts = torch.tensor([int(((gid == k) & valid).sum()) for k in range(num_groups)])
    return sums, counts


def check_grouped(out, plain, ref, **tol):
    "`out` (grouped, Triton) against the ungrouped Triton result `plain` and the grouped reference `ref`."
    assert isinstance(out, GroupedLoss) and isinstance(ref, GroupedLoss)
    torch.testing.assert_close(out.loss, plain, rtol=0, atol=0, equal_nan=True)  # the loss does not change
    torch.testing.assert_close(out.loss, ref.loss, equal_nan=True, **tol)
    assert out.group_loss_sum.dtype == ref.group_loss_sum.dtype and out.group_count.dtype == torch.int64
    assert not out.group_loss_sum.requires_grad and not out.group_count.requires_grad
    torch.testing.assert_close(out.group_loss_sum, ref.group_loss_sum, **tol)
    assert torch.equal(out.group_count.cpu(), ref.group_count.cpu())


@pytest.mark.parametrize("case", [((7, 129), torch.float64, 6), ((3, 5, 1000), torch.float32, 3)])
def test_grouped_ce(case, group_path, dev):
    shape, dtype, G = case
    x, t = make_ce(shape, dtype, dev)
    gid = make_groups(shape[:-1], G, dev)
    sums, counts = group_ref(cross_entropy_ref(x, t, reduction="none"), t, gid, G)
    for red in REDUCTIONS:
        xx = x.clone().requires_grad_()
        out = cross_entropy(xx, t, reduction=red, impl="triton", group_ids=gid, num_groups=G)
        ref = cross_entropy_ref(x, t, reduction=red, group_ids=gid, num_groups=G)
        check_grouped(out, cross_entropy(x, t, reduction=red, impl="triton"), ref, **TOL[dtype])
        torch.testing.assert_close(out.group_loss_sum.double().cpu(), sums.cpu(), **TOL[dtype])
        assert torch.equal(out.group_count.cpu(), counts) and out.group_loss_sum[G - 1] == 0 and out.group_count[G - 1] == 0
        if red == "none":  # the gradient is the ungrouped one (per-row upstream gradients)
            dx, = torch.autograd.grad(out.loss, xx, upstream(out.loss))
            torch.testing.assert_close(dx, grads(lambda a: cross_entropy(a, t, reduction=red, impl="triton"), [x])[1], rtol=0, atol=0)


def test_grouped_ce_edge_cases(dev):
    "Ignored rows count nowhere, empty groups give 0, all-ignored and zero-row batches, any integer id dtype."
    x, t = make_ce((4, 6, 30), torch.float64, dev, p_ignore=0.0)
    gid = torch.arange(24, device=dev).view(4, 6) % 3  # groups 0, 1, 2 round robin; group 3 empty
    t[gid == 1] = -100  # group 1 entirely ignored
    for dt in (torch.int64, torch.int32, torch.uint8):
        out = cross_entropy(x, t, impl="triton", group_ids=gid.to(dt), num_groups=4)
        check_grouped(out, cross_entropy(x, t, impl="triton"), cross_entropy_ref(x, t, group_ids=gid, num_groups=4))
        assert out.group_count.tolist() == [8, 0, 8, 0] and out.group_loss_sum[1] == 0 and out.group_loss_sum[3] == 0
    gid_nc = (torch.arange(48, device=dev).view(4, 12) % 3)[:, ::2]  # non-contiguous ids of shape (4, 6)
    assert not gid_nc.is_contiguous()
    out = cross_entropy(x, t, impl="triton", group_ids=gid_nc, num_groups=3)
    check_grouped(out, cross_entropy(x, t, impl="triton"), cross_entropy_ref(x, t, group_ids=gid_nc, num_groups=3))
    out = cross_entropy(x, t, impl="triton", group_ids=torch.zeros_like(gid), num_groups=1)  # one group: the sum
    check_grouped(out, cross_entropy(x, t, impl="triton"), cross_entropy_ref(x, t, group_ids=torch.zeros_like(gid), num_groups=1))
    torch.testing.assert_close(out.group_loss_sum[0], cross_entropy(x, t, reduction="sum", impl="triton"), **TOL[torch.float64])
    t_all = torch.full_like(t, -100)
    out = cross_entropy(x, t_all, impl="triton", group_ids=gid, num_groups=3)
    assert out.loss.isnan() and not out.group_loss_sum.any() and not out.group_count.any()
    x0, t0 = torch.randn(0, 5, dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    for red in REDUCTIONS:
        out = cross_entropy(x0, t0, reduction=red, impl="triton", group_ids=t0, num_groups=2)
        ref = cross_entropy_ref(x0, t0, reduction=red, group_ids=t0, num_groups=2)
        check_grouped(out, cross_entropy(x0, t0, reduction=red, impl="triton"), ref)
        assert out.group_count.tolist() == [0, 0]


def test_grouped_ce_many_programs_and_groups(dev, monkeypatch):
    "Small tiles: many programs whose partial rows are summed; 2000 groups take the atomic path on their own."
    for key in ("interpret", "gpu"):
        monkeypatch.setitem(xent_mod._LIMITS, key, dict(max_block_v=64, max_elems=128, max_group_tile=8))
    assert xent_mod._group_tile(5, 2, True) == 8 and xent_mod._group_tile(9, 2, True) == 0
    x, t = make_ce((3, 5, 70), torch.float64, dev)
    for G in (5, 9):  # partial rows over 8 programs, then atomics
        gid = make_groups((3, 5), G, dev, seed=G)
        out = cross_entropy(x, t, reduction="sum", impl="triton", group_ids=gid, num_groups=G)
        check_grouped(out, cross_entropy(x, t, reduction="sum", impl="triton"), cross_entropy_ref(x, t, reduction="sum", group_ids=gid, num_groups=G))
    monkeypatch.undo()
    assert xent_mod._group_tile(2000, 1, True) == 0
    x, t = make_ce((40, 9), torch.float32, dev)
    gid = torch.randint(0, 2000, (40,), generator=torch.Generator().manual_seed(0)).to(dev)
    out = cross_entropy(x, t, impl="triton", group_ids=gid, num_groups=2000)
    check_grouped(out, cross_entropy(x, t, impl="triton"), cross_entropy_ref(x, t, group_ids=gid, num_groups=2000), **TOL[torch.float32])


@pytest.mark.parametrize("case", [("partials", (3, 5), 100, 16, None, torch.float64), ("atomics", (7,), 129, 8, 3, torch.float32)])
def test_grouped_lce(case, dev, monkeypatch):
    "Linear CE: per-group sums accumulated over chunks (4 and 3 here); loss and gradients unchanged."
    path, lead, V, H, chunk, dtype = case
    if path == "atomics":
        for key in ("interpret", "gpu"):
            monkeypatch.setitem(xent_mod._LIMITS, key, dict(xent_mod._LIMITS[key], max_group_tile=0))
    h, w, t = make_lce(lead, V, H, dtype, dev)
    gid = make_groups(lead, 4, dev)
    for red in ("mean", "none"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = linear_cross_entropy(hh, ww, t, reduction=red, impl="triton", group_ids=gid, num_groups=4, _chunk_size=chunk)
        plain = grads(lambda a, b: linear_cross_entropy(a, b, t, reduction=red, impl="triton", _chunk_size=chunk), [h, w])
        check_grouped(out, plain[0], linear_cross_entropy_ref(h, w, t, reduction=red, group_ids=gid, num_groups=4), **TOL[dtype])
        dh, dw = torch.autograd.grad(out.loss, (hh, ww), upstream(out.loss))
        torch.testing.assert_close((dh, dw), plain[1:], rtol=0, atol=0)


def test_grouped_reference_and_auto():
    "impl='auto'/'torch' on CPU: the reference (scatter_add / bincount); without group_ids, a plain tensor as before."
    x, t = make_ce((3, 5, 17), torch.float32, "cpu")
    gid = make_groups((3, 5), 4, "cpu")
    rows = cross_entropy_ref(x, t, reduction="none")
    sums, counts = group_ref(rows, t, gid, 4)
    for impl in ("auto", "torch"):
        for red in REDUCTIONS:
            out = cross_entropy(x, t, reduction=red, impl=impl, group_ids=gid, num_groups=4)
            assert isinstance(out, GroupedLoss) and out._fields == ("loss", "group_loss_sum", "group_count")
            torch.testing.assert_close(out.loss, cross_entropy_ref(x, t, reduction=red), rtol=0, atol=0)  # bit for bit
            torch.testing.assert_close(out.group_loss_sum.double(), sums)
            assert torch.equal(out.group_count, counts)
            assert type(cross_entropy(x, t, reduction=red, impl=impl)) is torch.Tensor
    out = cross_entropy_ref(x.bfloat16(), t, group_ids=gid, num_groups=4, upcast=False)
    assert out.loss.dtype == torch.bfloat16 and out.group_loss_sum.dtype == torch.float32
    h, w, tl_ = make_lce((2, 3), 11, 4, torch.float32, "cpu")
    out = linear_cross_entropy(h, w, tl_, group_ids=make_groups((2, 3), 3, "cpu"), num_groups=3)
    assert isinstance(out, GroupedLoss) and out.loss.shape == () and out.group_count.sum() == (tl_ != -100).sum()
    loss, gsum, gcnt = out  # unpacks like a tuple


# ---------------------------------------------------------------- errors

X, T = torch.randn(4, 10), torch.tensor([1, 2, 3, -100])
HID, WT = torch.randn(2, 4, 8), torch.randn(10, 8)
TL = torch.randint(0, 10, (2, 4))
ERRORS = [
    (lambda: cross_entropy(X, torch.tensor([1, 2, 10, -100])), ValueError, "`target`: expected class indices in [0, 10) or ignore_index=-100, got 10 at index (2,)"),
    (lambda: cross_entropy(X, torch.tensor([1, -5, 0, 0])), ValueError, "`target`: expected class indices in [0, 10)"),
    (lambda: cross_entropy(X, T, ignore_index=-1), ValueError, "got -100 at index (3,)"),
    (lambda: cross_entropy(X, T.float()), TypeError, "`target`: expected dtype"),
    (lambda: cross_entropy(X, T.bool()), TypeError, "`target`: expected dtype"),
    (lambda: cross_entropy(X, [1, 2, 3, 4]), TypeError, "`target`: expected a torch.Tensor"),
    (lambda: cross_entropy(X, T[:3]), ValueError, "`target`: expected shape (4,) (the leading shape of `logits`), got (3,)"),
    (lambda: cross_entropy(X.long(), T), TypeError, "`logits`: expected dtype"),
    (lambda: cross_entropy(torch.tensor(1.0), torch.tensor(0)), ValueError, "`logits`: expected at least 1 dimension"),
    (lambda: cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long)), ValueError, "`logits`: expected a class (last) dimension of size >= 1"),
    (lambda: cross_entropy(X, T, reduction="avg"), ValueError, "`reduction`: expected one of 'mean', 'sum', 'none'"),
    (lambda: cross_entropy(X, T, impl="cuda"), ValueError, "`impl`: expected one of 'auto', 'triton', 'torch'"),
    (lambda: cross_entropy(X, T, ignore_index=1.5), ValueError, "`ignore_index`: expected an int"),
    (lambda: cross_entropy(X, T.to("meta")), ValueError, "`target` is on meta but `logits` is on cpu"),
    (lambda: linear_cross_entropy(HID, WT, torch.full((2, 4), 10)), ValueError, "`target`: expected class indices in [0, 10)"),
    (lambda: linear_cross_entropy(HID, WT.double(), TL), ValueError, "`weight`: expected dtype torch.float32 (the dtype of `hidden`)"),
    (lambda: linear_cross_entropy(HID, torch.randn(10, 9), TL), ValueError, "`weight`: expected shape (V, 8)"),
    (lambda: linear_cross_entropy(HID, torch.randn(10), TL), ValueError, "`weight`: expected 2 dimension"),
    (lambda: linear_cross_entropy(HID.long(), WT, TL), TypeError, "`hidden`: expected dtype"),
    (lambda: linear_cross_entropy(HID, WT, TL[0]), ValueError, "`target`: expected shape (2, 4) (the leading shape of `hidden`)"),
    (lambda: linear_cross_entropy(HID, WT, TL.float()), TypeError, "`target`: expected dtype"),
    (lambda: linear_cross_entropy(HID, WT.to("meta"), TL), ValueError, "`weight` is on meta but `hidden` is on cpu"),
    (lambda: linear_cross_entropy(HID, WT, TL, reduction="mean_tokens"), ValueError, "`reduction`"),
    (lambda: linear_cross_entropy(HID, WT, TL, impl="gpu"), ValueError, "`impl`"),
    (lambda: linear_cross_entropy(HID, WT, TL, _chunk_size=0), ValueError, "`_chunk_size`: expected a positive int"),
    (lambda: cross_entropy(X, T, num_groups=3), ValueError, "`num_groups`: expected None when `group_ids` is None (pass both or neither), got 3"),
    (lambda: cross_entropy(X, T, group_ids=T.clamp(min=0)), ValueError, "`num_groups`: expected a positive int when `group_ids` is given"),
    (lambda: cross_entropy(X, T, group_ids=T.clamp(min=0), num_groups=0), ValueError, "`num_groups`: expected a positive int"),
    (lambda: cross_entropy(X, T, group_ids=T.clamp(min=0), num_groups=True), ValueError, "`num_groups`: expected a positive int"),
    (lambda: cross_entropy(X, T, group_ids=T.clamp(min=0), num_groups=2.0), ValueError, "`num_groups`: expected a positive int"),
    (lambda: cross_entropy(X, T, group_ids=T.float(), num_groups=4), TypeError, "`group_ids`: expected dtype"),
    (lambda: cross_entropy(X, T, group_ids=[0, 1, 2, 3], num_groups=4), TypeError, "`group_ids`: expected a torch.Tensor"),
    (lambda: cross_entropy(X, T, group_ids=torch.zeros(3, dtype=torch.long), num_groups=4), ValueError, "`group_ids`: expected shape (4,) (the shape of `target`), got (3,)"),
    (lambda: cross_entropy(X, T, group_ids=torch.tensor([0, 1, 4, 0]), num_groups=4), ValueError, "`group_ids`: expected values in [0, 4) (num_groups=4), got 4 at index (2,)"),
    (lambda: cross_entropy(X, T, group_ids=torch.tensor([0, -1, 0, 0]), num_groups=4), ValueError, "`group_ids`: expected values in [0, 4) (num_groups=4), got -1 at index (1,)"),
    (lambda: cross_entropy(X, T, group_ids=torch.tensor([0, 0, 0, 9]), num_groups=4), ValueError, "got 9 at index (3,)"),  # ignored rows too
    (lambda: cross_entropy(X, T, group_ids=T.clamp(min=0).to("meta"), num_groups=4), ValueError, "`group_ids` is on meta but `target` is on cpu"),
    (lambda: linear_cross_entropy(HID, WT, TL, group_ids=TL), ValueError, "`num_groups`: expected a positive int when `group_ids` is given"),
    (lambda: linear_cross_entropy(HID, WT, TL, num_groups=2), ValueError, "`num_groups`: expected None when `group_ids` is None"),
    (lambda: linear_cross_entropy(HID, WT, TL, group_ids=TL[0], num_groups=10), ValueError, "`group_ids`: expected shape (2, 4) (the shape of `target`)"),
    (lambda: linear_cross_entropy(HID, WT, TL, group_ids=TL, num_groups=3), ValueError, "`group_ids`: expected values in [0, 3)"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    assert_raises_with(*ERRORS[i])


# ---------------------------------------------------------------- GPU, low precision

@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 32000), (7, 129), (3, 5, 1000), (1, 1), (64, 128256)])
def test_ce_low_precision_gpu(shape, dtype, reduction):
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("low-precision checks need compiled kernels: run with TRITON_INTERPRET=0")
    x, t = make_ce(shape, torch.float32, "cuda")
    kw = dict(reduction=reduction)
    out = grads(lambda a: cross_entropy(a, t, impl="triton", **kw), [x.to(dtype)])
    ref = grads(lambda a: cross_entropy_ref(a, t, **kw), [x])
    base = grads(lambda a: cross_entropy_ref(a, t, upcast=False, **kw), [x.to(dtype)])
    for name, o, r, b in zip(("loss", "dlogits"), out, ref, base):
        assert o.dtype == dtype
        assert_close_3way(o, r, b, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [((4096,), 32000, 1024, None), ((2, 257), 50257, 256, None), ((3, 5), 100, 16, 4)])
def test_lce_low_precision_gpu(case, dtype, reduction):
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("low-precision checks need compiled kernels: run with TRITON_INTERPRET=0")
    lead, V, H, chunk = case
    h, w, t = make_lce(lead, V, H, torch.float32, "cuda")
    w = w / H ** 0.5
    kw = dict(reduction=reduction)
    out = grads(lambda a, b: linear_cross_entropy(a, b, t, impl="triton", _chunk_size=chunk, **kw), [h.to(dtype), w.to(dtype)])
    ref = grads(lambda a, b: linear_cross_entropy_ref(a, b, t, **kw), [h, w])
    base = grads(lambda a, b: linear_cross_entropy_ref(a, b, t, upcast=False, **kw), [h.to(dtype), w.to(dtype)])
    for name, o, r, b in zip(("loss", "dhidden", "dweight"), out, ref, base):
        assert o.dtype == dtype
        assert_close_3way(o, r, b, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_groups", [3, 1000])  # partial rows; atomics
def test_grouped_gpu(num_groups, dtype):
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("needs compiled kernels: run with TRITON_INTERPRET=0")
    x, t = make_ce((4096, 32000), torch.float32, "cuda")
    gid = torch.randint(0, num_groups, (4096,), device="cuda")
    out = cross_entropy(x.to(dtype), t, impl="triton", group_ids=gid, num_groups=num_groups)
    ref = cross_entropy_ref(x.to(dtype), t, group_ids=gid, num_groups=num_groups)  # upcasts like the kernel
    assert out.group_loss_sum.dtype == torch.float32 and torch.equal(out.group_count, ref.group_count)
    torch.testing.assert_close(out.group_loss_sum, ref.group_loss_sum, atol=1e-3, rtol=1e-5)
    assert torch.equal(out.loss, cross_entropy(x.to(dtype), t, impl="triton"))
    h, w, tl_ = make_lce((2, 1000), 50257, 256, torch.float32, "cuda")
    gid = torch.randint(0, num_groups, (2, 1000), device="cuda")
    out = linear_cross_entropy(h.to(dtype), (w / 16).to(dtype), tl_, impl="triton", group_ids=gid, num_groups=num_groups)
    ref = linear_cross_entropy_ref(h.to(dtype), (w / 16).to(dtype), tl_, group_ids=gid, num_groups=num_groups)
    assert torch.equal(out.group_count, ref.group_count)
    torch.testing.assert_close(out.group_loss_sum, ref.group_loss_sum, atol=5e-2 if dtype == torch.bfloat16 else 1e-3, rtol=1e-2)
