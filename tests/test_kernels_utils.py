"""Kernel plumbing (trainlab.kernels.utils): triton stand-ins, interpreter detection, dispatch, checks, block sizes,
tolerances and the benchmark harness."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainlab.kernels import utils as U
from trainlab.kernels.norm import _rmsnorm_fwd_kernel

ROOT = Path(__file__).resolve().parents[1]


def _plain(x): return x


# ---------------------------------------------------------------- triton import, interpreter, dispatch

def test_standins_define_and_fail_on_launch():
    triton_, tl_ = U._standins()

    @triton_.jit
    def k(X, N, BLOCK: tl_.constexpr):
        pass

    @triton_.autotune(configs=[triton_.Config({})], key=["N"])
    @triton_.jit
    def k2(X, BLOCK: tl_.constexpr):
        pass

    assert triton_.cdiv(7, 2) == 4 and triton_.next_power_of_2(5) == 8
    for launch in (lambda: k[(1,)](None, 1, BLOCK=8), lambda: k(None), lambda: k2[(1,)](None, BLOCK=8)):
        with pytest.raises(RuntimeError, match="`triton` package is not installed"):
            launch()
    assert not U.interpreting(k) or U.HAS_TRITON  # a stand-in is never an interpreter kernel


def test_interpreting_matches_environment():
    assert U.HAS_TRITON
    expected = os.environ.get("TRITON_INTERPRET", "0") == "1"
    assert U.interpreting() is expected
    assert U.interpreting(_rmsnorm_fwd_kernel) is expected
    assert U.interpreting(_plain) is False


def test_resolve_impl():
    x = torch.zeros(2)
    assert U.resolve_impl("auto", x) == "torch"
    assert U.resolve_impl("torch", x, kernel=_rmsnorm_fwd_kernel) == "torch"
    with pytest.raises(ValueError, match="`impl`: expected one of 'auto', 'triton', 'torch', got 'cuda'"):
        U.resolve_impl("cuda", x)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 in the environment before importing trainlab.kernels"):
        U.resolve_impl("triton", x, kernel=_plain)  # a kernel that is not an interpreter kernel, on CPU
    if U.interpreting():
        assert U.resolve_impl("triton", x, kernel=_rmsnorm_fwd_kernel) == "triton"


def _run(code, env_extra):
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_compiled_kernels_on_cpu_give_clear_error():
    "Without the interpreter, impl='triton' on CPU tensors fails with the fix in the message; 'auto' still works."
    r = _run("""
        import torch, trainlab.kernels as K
        assert not K.interpreting()
        x, w = torch.randn(3, 8), torch.ones(8)
        assert torch.equal(K.rmsnorm(x, w), K.rmsnorm_ref(x, w))
        for call in (lambda: K.rmsnorm(x, w, impl="triton"), lambda: K.cross_entropy(x, torch.zeros(3, dtype=torch.long), impl="triton")):
            try: call()
            except RuntimeError as e: assert "TRITON_INTERPRET=1" in str(e), e
            else: raise AssertionError("no error")
        print("ok")
    """, {"TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_import_without_triton():
    "With triton unimportable, trainlab.kernels still imports, 'auto' runs the reference and 'triton' says why not."
    r = _run("""
        import sys; sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, trainlab.kernels as K
        assert not K.HAS_TRITON and not K.interpreting()
        x, w, t = torch.randn(3, 8), torch.ones(8), torch.tensor([1, 2, -100])
        assert torch.equal(K.rmsnorm(x, w), K.rmsnorm_ref(x, w))
        assert torch.equal(K.cross_entropy(x, t), K.cross_entropy_ref(x, t))
        assert torch.equal(K.RMSNorm(8)(x), K.rmsnorm_ref(x, w))
        try: K.rmsnorm(x, w, impl="triton")
        except RuntimeError as e: assert "not installed" in str(e), e
        else: raise AssertionError("no error")
        print("ok")
    """, {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------- checks

def test_check_tensor_messages():
    x = torch.randn(4, 8)
    assert U.check_tensor("x", x, dims=(1, 2), dtypes=U.FLOAT_DTYPES, device="cpu", min_dims=2) is x
    cases = [
        (lambda: U.check_tensor("x", 3.0), TypeError, "`x`: expected a torch.Tensor, got float"),
        (lambda: U.check_tensor("x", x, dims=3), ValueError, "`x`: expected 3 dimension(s), got shape (4, 8)"),
        (lambda: U.check_tensor("x", x, dims=(1, 3)), ValueError, "expected 1 or 3 dimension(s)"),
        (lambda: U.check_tensor("x", x, min_dims=3), ValueError, "`x`: expected at least 3 dimension(s)"),
        (lambda: U.check_floating("x", x.int()), TypeError, "`x`: expected dtype float16, bfloat16, float32, float64, got int32"),
        (lambda: U.check_integer("target", x), TypeError, "`target`: expected dtype int8"),
        (lambda: U.check_tensor("x", x, device="meta"), ValueError, "`x`: expected a tensor on meta, got one on cpu"),
        (lambda: U.check_shape("w", x, (4, 9), "(from x)"), ValueError, "`w`: expected shape (4, 9) (from x), got (4, 8)"),
        (lambda: U.check_same_device(a=x, b=x, c=x.to("meta")), ValueError, "`c` is on meta but `a` is on cpu"),
        (lambda: U.check_choice("mode", "fwd", U.MODES), ValueError, "`mode`: expected one of 'forward', 'backward', 'full', got 'fwd'"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc) as e:
            fn()
        assert msg in str(e.value), (msg, str(e.value))
    assert U.check_same_device(a=x, b=x) == torch.device("cpu")


def test_rows_and_contiguity():
    x = torch.randn(5, 3, 4).transpose(0, 1)
    r = U.as_rows(x)
    assert r.shape == (15, 4) and r.is_contiguous() and torch.equal(r, x.reshape(-1, 4))
    y = torch.randn(6, 4)
    assert U.as_rows(y) is y and U.as_rows(torch.randn(4)).shape == (1, 4)

    @U.ensure_contiguous
    def f(a, b=None, c=3): return a.is_contiguous(), b.is_contiguous(), c
    assert f(x, b=x.transpose(0, 2)) == (True, True, 3)


def test_block_sizes():
    assert [U.next_power_of_2(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    assert U.cdiv(10, 3) == 4 and U.cdiv(0, 3) == 0
    assert U.calculate_settings(1) == (1, 4)
    assert U.calculate_settings(1000) == (1024, 4)
    assert U.calculate_settings(4096) == (4096, 8)
    assert U.calculate_settings(10_000) == (16384, 16)
    assert U.calculate_settings(10**6) == (65536, 32)  # capped, not an error: kernels loop over tiles
    assert U.calculate_settings(300, max_block=64) == (64, 4)
    assert U.block_rows(4096, 512, 2**17) == 256
    assert U.block_rows(7, 129, 2**17) == 8
    assert U.block_rows(4096, 65536, 2**17) == 2
    assert U.block_rows(1, 1, 4096) == 1 and U.block_rows(5000, 3, 100) == 32
    assert U.num_sms("cpu") == 1
    assert U.compute_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert U.compute_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64


# ---------------------------------------------------------------- tolerances

def test_tolerances():
    assert U.default_tol(torch.bfloat16) == dict(atol=5e-2, rtol=5e-2)
    assert U.default_tol(torch.float32)["atol"] == 1e-4
    ref = torch.randn(257, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo = ref.to(torch.bfloat16)
    e_out, e_base = U.assert_close_3way(lo, ref, lo)
    assert e_out == e_base > 0
    U.assert_close_3way(lo + 0.01, ref, lo)  # within 2 * err + atol
    with pytest.raises(AssertionError, match="kernel error"):
        U.assert_close_3way(lo + 1, ref, lo)
    nan = float("nan")
    assert U.max_abs_err(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.25])) == 0.25
    assert U.max_abs_err(torch.tensor([nan]), torch.tensor([1.0])) == float("inf")
    assert U.max_abs_err(torch.tensor([float("inf")]), torch.tensor([float("inf")])) == 0.0
    assert U.max_abs_err(torch.zeros(0), torch.zeros(0)) == 0.0


# ---------------------------------------------------------------- benchmark harness

def test_bench_cpu_fallback():
    a = torch.randn(64, 64)
    q50, q20, q80 = U.bench(lambda: a @ a, "cpu")
    assert 0 < q20 <= q50 <= q80
    assert U.peak_memory(lambda: a @ a, "cpu") is None
    assert U.device_label("cpu") == "cpu"


def test_make_mode_fn():
    x = torch.randn(5, 3, requires_grad=True)
    f = lambda: (x * 2).sum()
    fn, g2n = U.make_mode_fn("forward", f, [x])
    assert fn().ndim == 0 and g2n == [x]
    fn, _ = U.make_mode_fn("backward", f, [x])
    fn(); fn()  # retained graph: backward twice
    assert torch.equal(x.grad, torch.full_like(x, 4.0))
    x.grad = None
    fn, _ = U.make_mode_fn("full", f, [x])
    fn()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="`mode`"):
        U.make_mode_fn("both", f)


def test_csv_append_overwrite_and_atomicity(tmp_path, monkeypatch):
    p = tmp_path / "results" / "all.csv"
    row = U.bench_row("rmsnorm", "triton", "forward", "speed", "ms", "N", "hidden size", 1024, (1.0, 0.9, 1.2),
                      {"M": 4096, "dtype": "bfloat16"}, "NVIDIA H100")
    assert tuple(row) == U.CSV_COLUMNS and row["extra_benchmark_config_str"] == '{"M": 4096, "dtype": "bfloat16"}'
    U.append_rows([row], p)
    U.append_rows([row | dict(kernel_name="cross_entropy")], p)
    U.append_rows([row | dict(gpu_name="cpu")], p)
    assert len(U.read_rows(p)) == 3
    U.append_rows([row | dict(y_value_50=2.0)], p, overwrite=True)  # drops rmsnorm on H100 only
    rows = U.read_rows(p)
    assert sorted((r["kernel_name"], r["gpu_name"], r["y_value_50"]) for r in rows) == [
        ("cross_entropy", "NVIDIA H100", "1.0"), ("rmsnorm", "NVIDIA H100", "2.0"), ("rmsnorm", "cpu", "1.0")]
    monkeypatch.setenv("OVERWRITE", "1")
    U.append_rows([row | dict(y_value_50=3.0)], p)
    assert sorted(r["y_value_50"] for r in U.read_rows(p) if r["kernel_name"] == "rmsnorm") == ["1.0", "3.0"]
    assert p.read_text().splitlines()[0] == ",".join(U.CSV_COLUMNS)
    assert sorted(f.name for f in p.parent.iterdir()) == ["all.csv"]  # no temporary files left behind
    assert U.read_rows(tmp_path / "missing.csv") == []


def test_run_bench_records_and_plots(tmp_path):
    def setup(provider, mode, x):
        if provider == "liger": raise U.SkipCase("not installed")
        inp = torch.randn(4, x, requires_grad=True)
        return U.make_mode_fn(mode, lambda: torch.softmax(inp, -1).square().sum(), [inp])
    logs = []
    rows = U.run_bench("toy", setup, ["torch", "liger"], U.MODES, "N", "row length", [8, 16], device="cpu",
                       extra_config={"M": 4}, csv_path=tmp_path / "all.csv", log=logs.append)
    assert len(rows) == 6 and {r["metric_name"] for r in rows} == {"speed"}  # no memory metric on CPU
    assert sum("skip" in l for l in logs) == 6
    assert len(U.read_rows(tmp_path / "all.csv")) == 6
    assert sorted(f.name for f in (tmp_path / "cpu").glob("*.png")) == ["toy_speed_backward.png", "toy_speed_forward.png",
                                                                      "toy_speed_full.png"]
    assert '"M": 4' in rows[0]["extra_benchmark_config_str"] and rows[0]["version"].startswith(U.__version__)
    assert U.run_bench("toy", setup, ["torch"], ["forward"], "N", "n", [8], device="cpu", log=logs.append)  # no CSV


def test_bench_scripts_quick_cpu():
    "The benchmark scripts run end to end on CPU (--quick, eager provider, full mode only, nothing recorded)."
    for script in ("bench_rmsnorm.py", "bench_cross_entropy.py"):
        r = subprocess.run([sys.executable, str(ROOT / "kernels" / script), "--device", "cpu", "--quick", "--providers", "torch",
                            "--modes", "full"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        assert "torch" in r.stdout and "appended" not in r.stdout
