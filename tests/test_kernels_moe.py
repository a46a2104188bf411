"""MoE expert kernels vs. their references: grouped_expert_ffn (trainlab.kernels.moe) and
chunk_sparse_ffn (trainlab.kernels.moe_chunk, whose public names trainlab.kernels.moe re-exports).

CPU: run with TRITON_INTERPRET=1 (tests/conftest.py sets it) so impl="triton" runs the kernels in the interpreter.
GPU: `TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_moe.py` adds the bf16/fp16 three-way checks.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainlab.kernels import moe, moe_chunk
from trainlab.kernels.moe import (
    PackedExperts, chunk_sparse_ffn, chunk_sparse_ffn_packed, chunk_sparse_ffn_ref,
    chunk_sparse_torch, grouped_expert_ffn, grouped_expert_ffn_ref, pack_experts, route_by_expert)
from trainlab.kernels.utils import assert_close_3way, interpreting, max_abs_err
from trainlab.moe.inference import bench_chunk_sparse_cpu
from kernel_checks import assert_raises_with

# Stated tolerances. Observed max abs errors at these sizes: fp64 <= 1e-14, fp32 <= 5e-6
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=5e-5, rtol=5e-5)}
NAMES = ("y", "dx", "dw_in", "dw_out", "dgates")



@pytest.fixture
def small_tiles(monkeypatch):
    "Every tile 16 wide: expert boundaries fall inside tiles, and every K loop runs several trips."
    for mod in (moe, moe_chunk):
        for key in ("interpret", "gpu"):
            monkeypatch.setitem(mod._LIMITS, key, {k: 16 for k in mod._LIMITS[key]})


def make(T, d, h, E, k, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w_in = torch.randn(E, h, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    w_out = torch.randn(E, d, h, generator=g, dtype=torch.float64) / math.sqrt(h)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :k]  # k distinct experts per token
    gates = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    dy = torch.randn(T, d, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, w_in, w_out)] + [ids.to(device), gates.to(device, dtype), dy.to(device, dtype)]


def fwd_bwd(f, x, w_in, w_out, ids, gates, dy, needs=(True, True, True, True)):
    leaves = [t.detach().requires_grad_(n) for t, n in zip((x, w_in, w_out, gates), needs)]
    y = f(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    wrt = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(y, wrt, dy) if wrt else ())
    return (y, *[next(grads) if t.requires_grad else None for t in leaves])


def check_grouped(x, w_in, w_out, ids, gates, dy, needs=(True, True, True, True), **tol):
    out = fwd_bwd(lambda *a: grouped_expert_ffn(*a, impl="triton"), x, w_in, w_out, ids, gates, dy, needs)
    ref = fwd_bwd(grouped_expert_ffn_ref, x, w_in, w_out, ids, gates, dy, needs)
    errs = {}
    for name, o, r in zip(NAMES, out, ref):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == r.dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, **(tol or TOL[x.dtype]), msg=lambda m: f"{name}: {m}")
        errs[name] = max_abs_err(o, r)
    return errs


# ---------------------------------------------------------------- grouped_expert_ffn

GROUPED_SHAPES = [  # (T, d, h, E, k): d and h not multiples of any tile
    (37, 45, 70, 6, 2), (1, 7, 9, 3, 1), (20, 33, 17, 4, 4), (64, 40, 24, 8, 3), (5, 130, 260, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", GROUPED_SHAPES)
def test_grouped_parity(shape, dtype, dev):
    check_grouped(*make(*shape, dtype=dtype, device=dev))


def test_grouped_small_tiles(dev, small_tiles):
    "16-wide tiles: up to 3 experts inside one tile, several K trips, several row blocks per expert in the dW kernel."
    x, w_in, w_out, ids, gates, dy = make(24, 20, 35, 7, 2, device=dev)
    rt = route_by_expert(ids, 7)
    starts = rt.sorted_expert[::16]
    ends = rt.sorted_expert[15::16]
    assert bool((starts[:ends.numel()] != ends).any()), "no tile spans an expert boundary"
    check_grouped(x, w_in, w_out, ids, gates, dy)
    check_grouped(*make(40, 18, 17, 2, 2, device=dev))  # busy experts: > 16 rows each
    check_grouped(*make(13, 16, 32, 5, 2, dtype=torch.float32, device=dev))


def _ids(rows):
    return torch.tensor(rows)


EDGE_CASES = {  # name: (T, E, k, ids or None)
    "unused_expert": (9, 5, 2, _ids([[0, 1], [1, 2], [2, 4], [4, 0]] * 2 + [[1, 0]])),
    "all_to_one_expert": (11, 5, 1, torch.full((11, 1), 2)),
    "all_to_one_expert_k2": (6, 4, 2, torch.full((6, 2), 3)),
    "k_1": (9, 5, 1, None),
    "k_equals_E": (9, 5, 5, None),
    "T_1": (1, 5, 2, None),
    "T_1_k_E": (1, 3, 3, None),
    "single_expert": (7, 1, 1, None),
    "duplicate_ids": (3, 5, 3, _ids([[1, 1, 0], [4, 4, 4], [2, 3, 2]])),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_grouped_edge_cases(case, dev):
    T, E, k, ids = EDGE_CASES[case]
    x, w_in, w_out, ids0, gates, dy = make(T, 13, 11, E, k, device=dev)
    ids = ids0 if ids is None else ids.to(dev)
    check_grouped(x, w_in, w_out, ids, gates, dy)
    # an expert without tokens gets an exact zero weight gradient
    _, _, dwi, dwo, _ = fwd_bwd(lambda *a: grouped_expert_ffn(*a, impl="triton"), x, w_in, w_out, ids, gates, dy)
    unused = torch.bincount(ids.reshape(-1).cpu(), minlength=E) == 0
    assert torch.equal(dwi[unused.to(dev)], torch.zeros_like(dwi[unused.to(dev)]))
    assert torch.equal(dwo[unused.to(dev)], torch.zeros_like(dwo[unused.to(dev)]))


def test_grouped_duplicates_are_summed(dev):
    "[e, e] with gates (a, b) equals [e] with gate a + b."
    x, w_in, w_out, _, _, _ = make(4, 9, 6, 3, 1, device=dev)
    ids2 = torch.tensor([[2, 2], [0, 0], [1, 1], [2, 2]], device=dev)
    g2 = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dev)
    y2 = grouped_expert_ffn(x, w_in, w_out, ids2, g2, impl="triton")
    y1 = grouped_expert_ffn(x, w_in, w_out, ids2[:, :1], g2.sum(1, keepdim=True), impl="triton")
    torch.testing.assert_close(y2, y1, **TOL[torch.float64])


@pytest.mark.parametrize("T,k", [(0, 2), (0, 1), (5, 0)])
def test_grouped_empty(T, k, dev):
    x, w_in, w_out, ids, gates, dy = make(max(T, 1), 8, 6, 3, max(k, 1), device=dev)
    x, ids, gates, dy = x[:T], ids[:T, :k], gates[:T, :k], dy[:T]
    y, dx, dwi, dwo, dg = fwd_bwd(lambda *a: grouped_expert_ffn(*a, impl="triton"), x, w_in, w_out, ids, gates, dy)
    assert y.shape == (T, 8) and y.dtype == x.dtype and torch.equal(y, torch.zeros_like(y))
    assert dx.shape == x.shape and dg.shape == gates.shape
    assert torch.equal(dwi, torch.zeros_like(w_in)) and torch.equal(dwo, torch.zeros_like(w_out))


def test_grouped_partial_grads(dev):
    "Frozen inputs get None, the others the right gradient (each backward branch on its own)."
    data = make(15, 12, 10, 4, 2, device=dev)
    for needs in [(True, False, False, False), (False, True, False, False), (False, False, True, False),
                  (False, False, False, True), (True, False, True, False), (False, False, False, False)]:
        if not any(needs):
            with torch.no_grad():
                y = grouped_expert_ffn(*data[:5], impl="triton")
            torch.testing.assert_close(y, grouped_expert_ffn_ref(*data[:5]), **TOL[torch.float64])
            continue
        check_grouped(*data, needs=needs)


def test_grouped_no_grad_and_inference_mode(dev):
    data = make(15, 12, 10, 4, 2, device=dev)
    leaves = [t.requires_grad_() for t in (data[0], data[1], data[2], data[4])]
    ref = grouped_expert_ffn_ref(*data[:5]).detach()
    with torch.no_grad():
        y = grouped_expert_ffn(*data[:5], impl="triton")
    assert not y.requires_grad
    torch.testing.assert_close(y, ref, **TOL[torch.float64])
    with torch.inference_mode():
        torch.testing.assert_close(grouped_expert_ffn(*data[:5], impl="triton"), ref, **TOL[torch.float64])
    assert all(t.grad is None for t in leaves)


def test_grouped_non_contiguous(dev):
    x, w_in, w_out, ids, gates, dy = make(17, 12, 10, 4, 2, device=dev)
    xn = x.T.contiguous().T  # column-major
    w_in_n = w_in.transpose(1, 2).contiguous().transpose(1, 2)
    w_out_n = w_out.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    ids_n = ids.T.contiguous().T.to(torch.int32)
    gates_n = gates.T.contiguous().T
    dy_n = dy.T.contiguous().T
    assert not any(t.is_contiguous() for t in (xn, w_in_n, w_out_n, ids_n, gates_n))
    check_grouped(xn, w_in_n, w_out_n, ids_n, gates_n, dy_n)
    xe = x[:1].expand(17, 12)  # stride-0 rows
    check_grouped(xe, w_in, w_out, ids, gates, dy)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_grouped_id_dtypes(id_dtype, dev):
    x, w_in, w_out, ids, gates, dy = make(9, 8, 6, 4, 2, device=dev)
    check_grouped(x, w_in, w_out, ids.to(id_dtype), gates, dy)


def test_grouped_mixed_dtypes(dev):
    "fp32 x and gates with fp64 weights compute in fp64 and return fp32, like the reference; fp64 gates with fp32 rest."
    x, w_in, w_out, ids, gates, dy = make(9, 8, 6, 4, 2, device=dev)
    check_grouped(x.float(), w_in, w_out, ids, gates.float(), dy.float(), atol=1e-6, rtol=1e-6)
    check_grouped(x.float(), w_in.float(), w_out.float(), ids, gates, dy.float())


def test_grouped_gradcheck(dev):
    x, w_in, w_out, ids, gates, _ = make(4, 5, 6, 3, 2, device=dev)
    leaves = [t.requires_grad_() for t in (x, w_in, w_out, gates)]
    f = lambda a, b, c, g: grouped_expert_ffn(a, b, c, ids, g, impl="triton")
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_grouped_equals_dense_score_form(dev):
    "The top-k form equals the dense-score form with the gates scattered into [T, E]."
    x, w_in, w_out, ids, gates, _ = make(12, 10, 7, 5, 3, device=dev)
    scores = torch.zeros(12, 5, dtype=torch.float64, device=dev).scatter_add(1, ids, gates)
    torch.testing.assert_close(grouped_expert_ffn(x, w_in, w_out, ids, gates, impl="triton"),
                               chunk_sparse_ffn_ref(x, w_in, w_out, scores), **TOL[torch.float64])


def test_route_by_expert():
    ids = torch.tensor([[2, 0], [1, 2], [2, 3], [0, 2], [3, 1]])
    rt = route_by_expert(ids, 5)
    assert rt.sorted_expert.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert rt.pair.tolist() == [1, 6, 2, 9, 0, 3, 4, 7, 5, 8]  # stable: ties keep pair order
    assert rt.token.tolist() == [0, 3, 1, 4, 0, 1, 2, 3, 2, 4]
    assert rt.counts.tolist() == [2, 2, 4, 2, 0] and rt.offsets.tolist() == [0, 2, 4, 8, 10, 10]
    assert all(t.dtype == torch.int32 for t in rt)
    empty = route_by_expert(torch.zeros(0, 2, dtype=torch.long), 3)
    assert empty.pair.numel() == 0 and empty.offsets.tolist() == [0, 0, 0, 0]


def test_grouped_auto_and_torch_on_cpu_run_the_reference():
    x, w_in, w_out, ids, gates, _ = make(9, 8, 6, 4, 2, dtype=torch.float32)
    ref = grouped_expert_ffn_ref(x, w_in, w_out, ids, gates)
    assert torch.equal(grouped_expert_ffn(x, w_in, w_out, ids, gates), ref)
    assert torch.equal(grouped_expert_ffn(x, w_in, w_out, ids, gates, impl="torch"), ref)


def test_grouped_reference_properties():
    "The loop reference equals a per-token loop, and upcast=False keeps the low-precision dtype."
    x, w_in, w_out, ids, gates, _ = make(6, 8, 5, 4, 2)
    want = torch.stack([sum(gates[t, j] * w_out[ids[t, j]] @ torch.nn.functional.silu(w_in[ids[t, j]] @ x[t])
                            for j in range(2)) for t in range(6)])
    torch.testing.assert_close(grouped_expert_ffn_ref(x, w_in, w_out, ids, gates), want, **TOL[torch.float64])
    lo = [t.to(torch.bfloat16) for t in (x, w_in, w_out)]
    assert grouped_expert_ffn_ref(*lo, ids, gates).dtype == torch.bfloat16
    assert grouped_expert_ffn_ref(*lo, ids, gates, upcast=False).dtype == torch.bfloat16


# ---------------------------------------------------------------- chunk_sparse_ffn

def make_chunk(T, d, h, E, n_union, dtype=torch.float64, device="cpu", seed=0):
    "Scores whose union is exactly `n_union` experts (each token uses 1 to 3 of them)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    w_in = torch.randn(E, h, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    w_out = torch.randn(E, d, h, generator=g, dtype=torch.float64) / math.sqrt(h)
    scores = torch.zeros(T, E, dtype=torch.float64)
    union = torch.randperm(E, generator=g)[:n_union]
    for i, e in enumerate(union.tolist()): scores[i % T, e] = 0.1 + torch.rand(1, generator=g).item()
    if n_union:
        extra = union[torch.randint(0, n_union, (T, 2), generator=g)]
        vals = torch.rand(T, 2, generator=g, dtype=torch.float64) * (torch.rand(T, 2, generator=g) < 0.5)
        scores = torch.maximum(scores, torch.zeros_like(scores).scatter_(1, extra, vals))
    assert int(scores.any(0).sum()) == n_union
    return [t.to(device, dtype) for t in (x, w_in, w_out, scores)]


CHUNK_CASES = [  # (T, d, h, E, n_union)
    (8, 45, 70, 8, 3), (1, 33, 17, 6, 1), (1, 33, 17, 6, 6), (32, 40, 24, 16, 5), (8, 45, 70, 8, 0), (8, 45, 70, 8, 8),
    (19, 130, 260, 4, 2)]


def _impls():
    return ["torch"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CHUNK_CASES)
def test_chunk_parity(case, dtype, impl):
    if impl not in _impls(): pytest.skip("impl='triton' needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cuda" if impl == "triton" and not interpreting() else "cpu"
    x, w_in, w_out, scores = make_chunk(*case, dtype=dtype, device=device)
    with torch.no_grad():
        y = chunk_sparse_ffn(x, w_in, w_out, scores, impl=impl)
    ref = chunk_sparse_ffn_ref(x, w_in, w_out, scores)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_chunk_triton_small_tiles(dev, small_tiles):
    for case in [(19, 20, 35, 6, 3), (33, 17, 20, 3, 2)]:
        x, w_in, w_out, scores = make_chunk(*case, device=dev)
        torch.testing.assert_close(chunk_sparse_ffn(x, w_in, w_out, scores, impl="triton"),
                                   chunk_sparse_ffn_ref(x, w_in, w_out, scores), **TOL[torch.float64])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_never_reads_inactive_experts(impl):
    "Inactive experts' weights set to NaN: the dense reference turns NaN, the sparse paths stay finite and exact."
    if impl not in _impls(): pytest.skip("impl='triton' needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cuda" if impl == "triton" and not interpreting() else "cpu"
    x, w_in, w_out, scores = make_chunk(8, 45, 70, 8, 3, device=device)
    want = chunk_sparse_ffn_ref(x, w_in, w_out, scores)
    inactive = ~scores.any(0)
    w_in[inactive], w_out[inactive] = float("nan"), float("nan")
    assert chunk_sparse_ffn_ref(x, w_in, w_out, scores).isnan().all()
    y = chunk_sparse_ffn(x, w_in, w_out, scores, impl=impl)
    torch.testing.assert_close(y, want, **TOL[torch.float64])


@pytest.mark.parametrize("n_union", [0, 1, 3, 8])
def test_chunk_torch_path_work_scales_with_the_union(n_union):
    "A spy: the matmul FLOPs of the CPU path are those of the union's experts only (4 T |U| h d), and no loop over experts."
    from torch.utils.flop_counter import FlopCounterMode
    T, d, h, E = 8, 24, 16, 8
    x, w_in, w_out, scores = make_chunk(T, d, h, E, n_union)
    with FlopCounterMode(display=False) as fc:
        chunk_sparse_torch(x, w_in, w_out, scores)
    assert fc.get_total_flops() == 4 * T * n_union * h * d
    ops = {str(op) for op in fc.get_flop_counts().get("Global", {})}
    assert ops == ({"aten.mm", "aten.bmm"} if n_union else set())  # one matmul up, one batched matmul down


def test_chunk_torch_path_index_selects_only_the_union(monkeypatch):
    "A spy on the weight gather: only the active experts' rows are selected."
    x, w_in, w_out, scores = make_chunk(8, 24, 16, 8, 3)
    seen = []
    orig = torch.Tensor.index_select
    def spy(self, dim, index):
        seen.append((tuple(self.shape), dim, index.tolist()))
        return orig(self, dim, index)
    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    chunk_sparse_ffn(x, w_in, w_out, scores)
    union = scores.any(0).nonzero().view(-1).tolist()
    assert (tuple(w_in.shape), 0, union) in seen and (tuple(w_out.shape), 0, union) in seen


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_gradients_are_the_dense_ones(impl):
    "Inside autograd: sparse forward, exact dense gradients (also for the scores of inactive experts)."
    if impl not in _impls(): pytest.skip("impl='triton' needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cuda" if impl == "triton" and not interpreting() else "cpu"
    x, w_in, w_out, scores = make_chunk(6, 10, 7, 5, 2, device=device)
    dy = torch.randn(6, 10, dtype=torch.float64, device=device)
    res = []
    for f in (lambda *a: chunk_sparse_ffn(*a, impl=impl), chunk_sparse_ffn_ref):
        leaves = [t.detach().requires_grad_() for t in (x, w_in, w_out, scores)]
        y = f(*leaves)
        res.append((y, *torch.autograd.grad(y, leaves, dy)))
    for name, a, b in zip(("y", "dx", "dw_in", "dw_out", "dscores"), *res):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"{name}: {m}")
    assert (res[0][4][:, ~scores.any(0)] != 0).any()  # inactive scores do get a gradient
    frozen = [t.detach() for t in (x, w_in, w_out)] + [scores.detach().requires_grad_()]
    (ds,) = torch.autograd.grad(chunk_sparse_ffn(*frozen, impl=impl), frozen[3], dy)
    torch.testing.assert_close(ds, res[1][4], **TOL[torch.float64])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_no_grad_safe(impl):
    if impl not in _impls(): pytest.skip("impl='triton' needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cuda" if impl == "triton" and not interpreting() else "cpu"
    x, w_in, w_out, scores = make_chunk(8, 20, 12, 6, 3, device=device)
    params = [torch.nn.Parameter(t) for t in (w_in, w_out)]
    ref = chunk_sparse_ffn_ref(x, w_in, w_out, scores)
    with torch.no_grad():
        y = chunk_sparse_ffn(x, *params, scores, impl=impl)
    assert not y.requires_grad
    torch.testing.assert_close(y, ref, **TOL[torch.float64])
    with torch.inference_mode():
        torch.testing.assert_close(chunk_sparse_ffn(x, *params, scores, impl=impl), ref, **TOL[torch.float64])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_empty_and_non_contiguous(impl):
    if impl not in _impls(): pytest.skip("impl='triton' needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cuda" if impl == "triton" and not interpreting() else "cpu"
    x, w_in, w_out, scores = make_chunk(8, 20, 12, 6, 3, device=device)
    y0 = chunk_sparse_ffn(x[:0], w_in, w_out, scores[:0], impl=impl)
    assert y0.shape == (0, 20) and y0.dtype == x.dtype
    args = (x.T.contiguous().T, w_in.transpose(1, 2).contiguous().transpose(1, 2),
            w_out.permute(2, 1, 0).contiguous().permute(2, 1, 0), scores.T.contiguous().T)
    assert not any(t.is_contiguous() for t in args)
    torch.testing.assert_close(chunk_sparse_ffn(*args, impl=impl), chunk_sparse_ffn_ref(x, w_in, w_out, scores),
                               **TOL[torch.float64])
    # mixed dtypes: fp32 x and scores, fp64 weights -> fp64 compute, fp32 output
    y = chunk_sparse_ffn(x.float(), w_in, w_out, scores.float(), impl=impl)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, chunk_sparse_ffn_ref(x.float(), w_in, w_out, scores.float()), atol=1e-6, rtol=1e-6)


def test_chunk_auto_on_cpu_is_the_union_torch_path():
    x, w_in, w_out, scores = make_chunk(8, 20, 12, 6, 3, dtype=torch.float32)
    assert torch.equal(chunk_sparse_ffn(x, w_in, w_out, scores), chunk_sparse_torch(x, w_in, w_out, scores))
    assert torch.equal(chunk_sparse_ffn(x, w_in, w_out, scores, impl="torch"), chunk_sparse_torch(x, w_in, w_out, scores))


# ---------------------------------------------------------------- pack_experts, chunk_sparse_ffn_packed

PACKED_CASES = CHUNK_CASES + [(1, 24, 16, 8, 0), (1, 24, 16, 8, 8), (3, 7, 5, 1, 1)]  # + T = 1 with none / all, E = 1
TOL_PACKED = {torch.float64: TOL[torch.float64], torch.float32: dict(atol=1e-5, rtol=1e-5)}  # fp32: 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_parity(case, dtype):
    x, w_in, w_out, scores = make_chunk(*case, dtype=dtype)
    packed = pack_experts(w_in, w_out)
    with torch.inference_mode():
        y = chunk_sparse_ffn_packed(x, packed, scores)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, chunk_sparse_ffn_ref(x, w_in, w_out, scores), **TOL_PACKED[dtype])
    torch.testing.assert_close(chunk_sparse_ffn_packed(x, packed, scores), y, atol=0, rtol=0)  # grad mode on: same


def test_packed_no_active_expert_gives_zeros():
    x, w_in, w_out, scores = make_chunk(8, 20, 12, 6, 3, dtype=torch.float32)
    y = chunk_sparse_ffn_packed(x, pack_experts(w_in, w_out), torch.zeros_like(scores))
    assert torch.equal(y, torch.zeros(8, 20)) and y.dtype == torch.float32
    y0 = chunk_sparse_ffn_packed(x[:0], pack_experts(w_in, w_out), scores[:0])
    assert y0.shape == (0, 20) and y0.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_non_contiguous(dtype):
    x, w_in, w_out, scores = make_chunk(9, 20, 12, 6, 4, dtype=dtype)
    want = chunk_sparse_ffn_ref(x, w_in, w_out, scores)
    args = (x.T.contiguous().T, w_in.transpose(1, 2).contiguous().transpose(1, 2),
            w_out.permute(2, 1, 0).contiguous().permute(2, 1, 0), scores.T.contiguous().T)
    assert not any(t.is_contiguous() for t in args)
    packed = pack_experts(args[1], args[2])
    torch.testing.assert_close(chunk_sparse_ffn_packed(args[0], packed, args[3]), want, **TOL_PACKED[dtype])
    xe = x[:1].expand(9, 20)  # stride-0 rows
    torch.testing.assert_close(chunk_sparse_ffn_packed(xe, packed, scores),
                               chunk_sparse_ffn_ref(xe, w_in, w_out, scores), **TOL_PACKED[dtype])
    wide = torch.zeros(9, 40, dtype=dtype); wide[:, ::2] = x  # every other column
    torch.testing.assert_close(chunk_sparse_ffn_packed(wide[:, ::2], packed, scores), want, **TOL_PACKED[dtype])


def test_packed_dtypes():
    "The pack computes in fp32 (fp64 if a weight is fp64), like the reference, and returns x.dtype."
    x, w_in, w_out, scores = make_chunk(8, 20, 12, 6, 3)
    p64 = pack_experts(w_in, w_out)
    assert p64.w_up.dtype == torch.float64
    y = chunk_sparse_ffn_packed(x.float(), p64, scores.float())  # fp32 x, fp64 weights: fp64 compute, fp32 out
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, chunk_sparse_ffn_ref(x.float(), w_in, w_out, scores.float()), atol=1e-6, rtol=1e-6)
    lo = [t.to(torch.bfloat16) for t in (w_in, w_out)]
    p = pack_experts(*lo)
    assert p.w_up.dtype == torch.float32  # upcast once at pack time, as the reference upcasts per call
    xb, sb = x.to(torch.bfloat16), scores.to(torch.bfloat16)
    yb = chunk_sparse_ffn_packed(xb, p, sb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, chunk_sparse_ffn_ref(xb, *lo, sb), atol=0, rtol=0)
    assert pack_experts(*lo, dtype=torch.bfloat16).w_up.dtype == torch.bfloat16


def test_pack_experts_layout():
    x, w_in, w_out, scores = make_chunk(8, 20, 12, 6, 3)
    p = pack_experts(w_in, w_out)
    assert isinstance(p, PackedExperts) and (p.num_experts, p.hidden) == (6, 12)
    assert p.w_up.shape == p.w_down.shape == (72, 20) and p.w_up.is_contiguous() and p.w_down.is_contiguous()
    for e in range(6):
        assert torch.equal(p.w_up[e * 12:(e + 1) * 12], w_in[e]) and torch.equal(p.w_down[e * 12:(e + 1) * 12], w_out[e].T)
    assert p.views == {}
    want = chunk_sparse_ffn_packed(x, p, scores)
    runs = moe_chunk.active_runs(scores.any(0).tolist())
    assert list(p.views) == runs  # the runs' views, cached
    for (a, b), (u, dn) in p.views.items():
        assert u.data_ptr() == p.w_up[a * 12:].data_ptr() and dn.data_ptr() == p.w_down[a * 12:].data_ptr()
        assert u.shape == dn.shape == ((b - a) * 12, 20)
    w_in.zero_(); w_out.zero_()  # a snapshot: later changes to the weights do not reach the pack
    torch.testing.assert_close(chunk_sparse_ffn_packed(x, p, scores), want, atol=0, rtol=0)
    assert repr(p) == "PackedExperts(E=6, h=12, d=20, dtype=float64, device=cpu)"
    leaf = torch.nn.Parameter(torch.randn(6, 12, 20))
    assert not pack_experts(leaf, torch.randn(6, 20, 12)).w_up.requires_grad


def test_packed_never_reads_inactive_experts():
    "Inactive experts' weights set to NaN before packing: the packed path stays finite and exact."
    x, w_in, w_out, scores = make_chunk(8, 45, 70, 8, 3)
    want = chunk_sparse_ffn_ref(x, w_in, w_out, scores)
    inactive = ~scores.any(0)
    w_in[inactive], w_out[inactive] = float("nan"), float("nan")
    torch.testing.assert_close(chunk_sparse_ffn_packed(x, pack_experts(w_in, w_out), scores), want, **TOL[torch.float64])


class _OpLog(TorchDispatchMode):
    "Records (op name, outputs) of every aten call, and the FLOPs of its matrix products (2 m k n each)."
    def __init__(self):
        super().__init__(); self.calls = []; self.flops = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        self.calls.append((name, outs))
        return out


@pytest.mark.parametrize("n_union", [1, 3, 8])
def test_packed_copies_no_weights(n_union):
    "A dispatch spy: every tensor of weight-block size seen during a call is a view of the packed weights (no copy)."
    T, d, h, E = 3, 40, 16, 8  # activations (at most T*E*h = 384 elements) stay below one weight block (h*d = 640)
    x, w_in, w_out, scores = make_chunk(T, d, h, E, n_union)
    packed = pack_experts(w_in, w_out)
    storages = {packed.w_up.untyped_storage().data_ptr(), packed.w_down.untyped_storage().data_ptr()}
    with _OpLog() as log:
        chunk_sparse_ffn_packed(x, packed, scores)
    big = [(name, o) for name, outs in log.calls for o in outs if o.numel() >= h * d]
    assert big, "the spy saw no weight block"
    for name, o in big:
        assert o.untyped_storage().data_ptr() in storages, f"{name} made a new weight-sized tensor {tuple(o.shape)}"
    names = {name for name, _ in log.calls}
    assert not names & {"index_select", "index", "clone", "cat", "stack", "bmm", "_to_copy", "copy_"}, names


def test_packed_matmuls_are_per_run():
    "One up and one down matmul per run of consecutive active experts, FLOPs of the union only."
    T, d, h, E = 8, 24, 16, 8
    x, w_in, w_out, _ = make_chunk(T, d, h, E, 1)
    packed = pack_experts(w_in, w_out)
    for active, runs in [([2, 3, 4], 1), ([0, 7], 2), ([1, 3, 4, 6], 3), (list(range(8)), 1)]:
        scores = torch.zeros(T, E, dtype=torch.float64)
        scores[torch.arange(T), torch.tensor(active)[torch.arange(T) % len(active)]] = 0.5
        with _OpLog() as log:
            y = chunk_sparse_ffn_packed(x, packed, scores)
        mms = [name for name, _ in log.calls if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm")]
        assert len(mms) == 2 * runs, (active, mms)
        assert log.flops == 4 * T * len(active) * h * d  # 2 T h d up and 2 T h d down per active expert
        torch.testing.assert_close(y, chunk_sparse_ffn_ref(x, w_in, w_out, scores), **TOL[torch.float64])


def test_chunk_sparse_ffn_torch_unchanged_next_to_packed():
    "The public chunk_sparse_ffn(impl='torch') keeps its behaviour and agrees with the packed path."
    x, w_in, w_out, scores = make_chunk(8, 20, 12, 6, 3, dtype=torch.float32)
    y = chunk_sparse_ffn(x, w_in, w_out, scores, impl="torch")
    assert torch.equal(y, chunk_sparse_torch(x, w_in, w_out, scores))
    torch.testing.assert_close(y, chunk_sparse_ffn_packed(x, pack_experts(w_in, w_out), scores), **TOL[torch.float32])


def test_bench_chunk_sparse_cpu():
    x, w_in, w_out, scores = make_chunk(8, 32, 16, 8, 2, dtype=torch.float32)
    threads = torch.get_num_threads()
    r = bench_chunk_sparse_cpu(x, w_in, w_out, scores, repeats=3, warmup=1)
    assert torch.get_num_threads() == threads
    for k in ("dense_us", "sparse_us", "speedup", "speedup_gmean", "active_fraction", "token_active_fraction"):
        assert isinstance(r[k], float) and math.isfinite(r[k]), k
    assert r["dense_us"] > 0 and r["sparse_us"] > 0 and r["speedup"] == pytest.approx(r["dense_us"] / r["sparse_us"])
    assert len(r["ratios"]) == 3 and all(math.isfinite(v) and v > 0 for v in r["ratios"])
    lo, hi = r["speedup_ci95"]
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= r["speedup_gmean"] <= hi
    assert len(r["times_us"]["dense"]) == len(r["times_us"]["sparse"]) == 3 and "old_us" not in r
    assert r["active_fraction"] == 0.25 and r["T"] == 8 and r["threads"] == 1 and r["repeats"] == 3
    r2 = bench_chunk_sparse_cpu(x, w_in, w_out, scores, repeats=2, warmup=0, compare_old=True)
    assert r2["old_us"] > 0 and r2["speedup_old"] == pytest.approx(r2["dense_us"] / r2["old_us"])
    assert len(r2["speedup_old_ci95"]) == 2 and len(r2["times_us"]["old"]) == 2
    with pytest.raises(ValueError, match="`repeats`"):
        bench_chunk_sparse_cpu(x, w_in, w_out, scores, repeats=0)


# ---------------------------------------------------------------- errors

X, WI, WO = torch.randn(4, 6), torch.randn(3, 5, 6), torch.randn(3, 6, 5)
IDS, G, S = torch.tensor([[0, 1], [2, 0], [1, 1], [2, 2]]), torch.rand(4, 2), torch.rand(4, 3)
ERRORS = [
    (lambda: grouped_expert_ffn(X, WI, WO, IDS + 1, G), ValueError, "`expert_ids`: expected expert indices in [0, 3)"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS - 1, G), ValueError, "`expert_ids`: expected expert indices in [0, 3)"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS.float(), G), TypeError, "`expert_ids`: expected dtype"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS.bool(), G), TypeError, "`expert_ids`: expected dtype"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS[0], G), ValueError, "`expert_ids`: expected 2 dimension"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS[:3], G[:3]), ValueError, "`expert_ids`: expected shape (4, k)"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS, G[:, :1]), ValueError, "`gates`: expected shape (4, 2)"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS, G.long()), TypeError, "`gates`: expected dtype"),
    (lambda: grouped_expert_ffn(X.long(), WI, WO, IDS, G), TypeError, "`x`: expected dtype"),
    (lambda: grouped_expert_ffn(X[0], WI, WO, IDS, G), ValueError, "`x`: expected 2 dimension"),
    (lambda: grouped_expert_ffn(X.numpy(), WI, WO, IDS, G), TypeError, "`x`: expected a torch.Tensor"),
    (lambda: grouped_expert_ffn(X, WI[0], WO, IDS, G), ValueError, "`w_in`: expected 3 dimension"),
    (lambda: grouped_expert_ffn(X, WI[..., :5], WO, IDS, G), ValueError, "`w_in`: expected shape (E, h, 6)"),
    (lambda: grouped_expert_ffn(X, WI, WO.transpose(1, 2), IDS, G), ValueError, "`w_out`: expected shape (3, 6, 5)"),
    (lambda: grouped_expert_ffn(X, WI, WO[:2], IDS, G), ValueError, "`w_out`: expected shape (3, 6, 5)"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS, G.to("meta")), ValueError, "`gates` is on meta"),
    (lambda: grouped_expert_ffn(X, WI, WO, IDS, G, impl="cuda"), ValueError, "`impl`: expected one of"),
    (lambda: chunk_sparse_ffn(X, WI, WO, S[:, :2]), ValueError, "`scores`: expected shape (4, 3)"),
    (lambda: chunk_sparse_ffn(X, WI, WO, S[0]), ValueError, "`scores`: expected 2 dimension"),
    (lambda: chunk_sparse_ffn(X, WI, WO, S.long()), TypeError, "`scores`: expected dtype"),
    (lambda: chunk_sparse_ffn(X, WI, WO.to("meta"), S), ValueError, "`w_out` is on meta"),
    (lambda: chunk_sparse_ffn(X[:, :5], WI, WO, S), ValueError, "`w_in`: expected shape (E, h, 5)"),
    (lambda: chunk_sparse_ffn(X, WI.int(), WO, S), TypeError, "`w_in`: expected dtype"),
    (lambda: chunk_sparse_ffn(X, WI, WO, S, impl="fast"), ValueError, "`impl`"),
    (lambda: chunk_sparse_ffn(X, torch.randn(0, 5, 6), torch.randn(0, 6, 5), S[:, :0]), ValueError, "`w_in`"),
    (lambda: bench_chunk_sparse_cpu(X, WI, WO, S, threads=0), ValueError, "`threads`"),
    (lambda: bench_chunk_sparse_cpu(X, WI, WO, S, warmup=-1), ValueError, "`warmup`"),
    (lambda: bench_chunk_sparse_cpu(X, WI, WO, S.long()), TypeError, "`scores`: expected dtype"),
    (lambda: pack_experts(WI, WO.transpose(1, 2)), ValueError, "`w_out`: expected shape (3, 6, 5)"),
    (lambda: pack_experts(WI, WO[:2]), ValueError, "`w_out`: expected shape (3, 6, 5)"),
    (lambda: pack_experts(WI[0], WO), ValueError, "`w_in`: expected 3 dimension"),
    (lambda: pack_experts(WI.int(), WO), TypeError, "`w_in`: expected dtype"),
    (lambda: pack_experts(WI, WO.long()), TypeError, "`w_out`: expected dtype"),
    (lambda: pack_experts(WI.numpy(), WO), TypeError, "`w_in`: expected a torch.Tensor"),
    (lambda: pack_experts(WI, WO.to("meta")), ValueError, "`w_out` is on meta"),
    (lambda: pack_experts(torch.randn(0, 5, 6), torch.randn(0, 6, 5)), ValueError, "`w_in`: expected shape (E, h, d) with E, h, d >= 1"),
    (lambda: pack_experts(WI, WO, dtype=torch.int64), TypeError, "`dtype`: expected a floating dtype"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_errors(i):
    assert_raises_with(*ERRORS[i])


# ---------------------------------------------------------------- GPU, low precision

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 512, 256, 32, 4), (37, 45, 70, 6, 2), (1, 64, 32, 8, 2), (2048, 256, 128, 8, 8)])
def test_grouped_low_precision_gpu(shape, dtype):
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("low-precision checks need compiled kernels: run with TRITON_INTERPRET=0")
    x, w_in, w_out, ids, gates, dy = make(*shape, dtype=torch.float32, device="cuda")
    lo = [t.to(dtype) for t in (x, w_in, w_out)] + [ids] + [t.to(dtype) for t in (gates, dy)]
    out = fwd_bwd(lambda *a: grouped_expert_ffn(*a, impl="triton"), *lo)
    ref = fwd_bwd(grouped_expert_ffn_ref, x, w_in, w_out, ids, gates, dy)
    base = fwd_bwd(lambda *a: grouped_expert_ffn_ref(*a, upcast=False), *lo)
    for name, o, r, b in zip(NAMES, out, ref, base):
        assert o.dtype == dtype
        assert_close_3way(o, r, b, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(32, 512, 64, 32, 8), (1, 512, 64, 32, 3), (8, 45, 70, 8, 3), (64, 256, 128, 16, 16)])
def test_chunk_low_precision_gpu(case, dtype):
    if not torch.cuda.is_available(): pytest.skip("needs CUDA")
    if interpreting(): pytest.skip("low-precision checks need compiled kernels: run with TRITON_INTERPRET=0")
    x, w_in, w_out, scores = make_chunk(*case, dtype=torch.float32, device="cuda")
    lo = [t.to(dtype) for t in (x, w_in, w_out, scores)]
    out = chunk_sparse_ffn(*lo, impl="triton")
    assert out.dtype == dtype
    assert_close_3way(out, chunk_sparse_ffn_ref(x, w_in, w_out, scores), chunk_sparse_ffn_ref(*lo, upcast=False))
