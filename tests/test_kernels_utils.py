"""Kernel plumbing (trainlab.kernels.utils): triton stand-ins, interpreter detection, dispatch, checks,
block sizes, the shared jitted helpers and tolerances; the parity figure (trainlab.kernels.parity_plot,
re-exported by utils) and the committed parity CSV; and the benchmark scripts' harness
(kernels/benchlib.py, outside the package)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainlab.kernels import parity_plot, utils as U
from trainlab.kernels.norm import _rmsnorm_fwd_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))  # the harness is a plain module next to the bench scripts
import benchlib as B  # noqa: E402


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
        (lambda: U.check_choice("mode", "fwd", B.MODES), ValueError, "`mode`: expected one of 'forward', 'backward', 'full', got 'fwd'"),
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
    sizes = (0, 1, 16, 17, 45, 64, 65, 10**6)
    assert [U.dot_tile(n, 64) for n in sizes] == [16, 16, 16, 32, 64, 64, 64, 64]
    assert U.dot_tile(100, 8) == 16  # never below tl.dot's minimum
    lo = torch.zeros(2, dtype=torch.bfloat16)
    assert not U.use_lowp(_rmsnorm_fwd_kernel, lo, lo)  # CPU tensors: never the tensor-core dot


def test_check_experts():
    x, w_in, w_out = torch.zeros(5, 6), torch.zeros(3, 4, 6), torch.zeros(3, 6, 4)
    assert U.check_experts(x, w_in, w_out) == (5, 6, 3, 4)
    w_in_msg = "`w_in`: expected shape (E, h, 6) with E, h >= 1"
    cases = [
        (lambda: U.check_experts(x.int(), w_in, w_out), TypeError, "`x`: expected dtype"),
        (lambda: U.check_experts(x[:, :0], w_in[..., :0], w_out[:, :0]), ValueError,
         "`x`: expected shape (T, d) with d >= 1"),
        (lambda: U.check_experts(x, w_in[:, :, :5], w_out), ValueError, w_in_msg),
        (lambda: U.check_experts(x, w_in[:0], w_out[:0]), ValueError, w_in_msg),
        (lambda: U.check_experts(x, w_in, w_out[:2]), ValueError, "`w_out`: expected shape (3, 6, 4)"),
        (lambda: U.check_experts(x, w_in, w_out[0]), ValueError, "`w_out`: expected 3 dimension"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc) as e:
            fn()
        assert msg in str(e.value), (msg, str(e.value))


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


# ------------------------------------------------------------ benchmark harness (kernels/benchlib.py)

def test_bench_cpu_fallback():
    a = torch.randn(64, 64)
    q50, q20, q80 = B.bench(lambda: a @ a, "cpu")
    assert 0 < q20 <= q50 <= q80
    assert B.peak_memory(lambda: a @ a, "cpu") is None
    assert B.device_label("cpu") == "cpu"
    assert B.quantiles([3.0, 1.0, 2.0, 4.0]) == pytest.approx((2.5, 1.6, 3.4))
    assert B.safe_name("NVIDIA H100 80GB/HBM3") == "NVIDIA_H100_80GB_HBM3"


def test_harness_is_outside_the_package():
    "The library carries no benchmark harness: it lives with the scripts, which import the rest from trainlab."
    assert not any(hasattr(U, n) for n in ("run_bench", "bench_row", "SkipCase", "bench_argparser"))
    assert B.read_rows is parity_plot.read_rows is U.read_rows
    assert U.plot_parity is parity_plot.plot_parity


def test_make_mode_fn():
    x = torch.randn(5, 3, requires_grad=True)
    f = lambda: (x * 2).sum()
    fn, g2n = B.make_mode_fn("forward", f, [x])
    assert fn().ndim == 0 and g2n == [x]
    fn, _ = B.make_mode_fn("backward", f, [x])
    fn(); fn()  # retained graph: backward twice
    assert torch.equal(x.grad, torch.full_like(x, 4.0))
    x.grad = None
    fn, _ = B.make_mode_fn("full", f, [x])
    fn()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="`mode`"):
        B.make_mode_fn("both", f)


def test_csv_append_overwrite_and_atomicity(tmp_path, monkeypatch):
    p = tmp_path / "results" / "all.csv"
    row = B.bench_row("rmsnorm", "triton", "forward", "speed", "ms", "N", "hidden size", 1024, (1.0, 0.9, 1.2),
                      {"M": 4096, "dtype": "bfloat16"}, "NVIDIA H100")
    assert tuple(row) == B.CSV_COLUMNS and row["extra_benchmark_config_str"] == '{"M": 4096, "dtype": "bfloat16"}'
    B.append_rows([row], p)
    B.append_rows([row | dict(kernel_name="cross_entropy")], p)
    B.append_rows([row | dict(gpu_name="cpu")], p)
    assert len(U.read_rows(p)) == 3
    B.append_rows([row | dict(y_value_50=2.0)], p, overwrite=True)  # drops rmsnorm on H100 only
    rows = U.read_rows(p)
    assert sorted((r["kernel_name"], r["gpu_name"], r["y_value_50"]) for r in rows) == [
        ("cross_entropy", "NVIDIA H100", "1.0"), ("rmsnorm", "NVIDIA H100", "2.0"), ("rmsnorm", "cpu", "1.0")]
    monkeypatch.setenv("OVERWRITE", "1")
    B.append_rows([row | dict(y_value_50=3.0)], p)
    assert sorted(r["y_value_50"] for r in U.read_rows(p) if r["kernel_name"] == "rmsnorm") == ["1.0", "3.0"]
    assert p.read_text().splitlines()[0] == ",".join(B.CSV_COLUMNS)
    assert sorted(f.name for f in p.parent.iterdir()) == ["all.csv"]  # no temporary files left behind
    assert U.read_rows(tmp_path / "missing.csv") == []


def test_run_bench_records_and_plots(tmp_path):
    def setup(provider, mode, x):
        if provider == "liger": raise B.SkipCase("not installed")
        inp = torch.randn(4, x, requires_grad=True)
        return B.make_mode_fn(mode, lambda: torch.softmax(inp, -1).square().sum(), [inp])
    logs = []
    rows = B.run_bench("toy", setup, ["torch", "liger"], B.MODES, "N", "row length", [8, 16], device="cpu",
                       extra_config={"M": 4}, csv_path=tmp_path / "all.csv", log=logs.append)
    assert len(rows) == 6 and {r["metric_name"] for r in rows} == {"speed"}  # no memory metric on CPU
    assert sum("skip" in l for l in logs) == 6
    assert len(U.read_rows(tmp_path / "all.csv")) == 6
    assert sorted(f.name for f in (tmp_path / "cpu").glob("*.png")) == ["toy_speed_backward.png", "toy_speed_forward.png",
                                                                      "toy_speed_full.png"]
    assert '"M": 4' in rows[0]["extra_benchmark_config_str"] and rows[0]["version"].startswith(B.__version__)
    assert B.run_bench("toy", setup, ["torch"], ["forward"], "N", "n", [8], device="cpu", log=logs.append)  # no CSV


def test_bench_scripts_quick_cpu():
    "The benchmark scripts run end to end on CPU (--quick, eager provider, full mode only, nothing recorded)."
    for script in ("bench_rmsnorm.py", "bench_cross_entropy.py"):
        r = subprocess.run([sys.executable, str(ROOT / "kernels" / script), "--device", "cpu", "--quick", "--providers", "torch",
                            "--modes", "full"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
        assert "torch" in r.stdout and "appended" not in r.stdout


# ---------------------------------------------------------------- parity figure and the committed parity CSV

PARITY_CSV = ROOT / "kernels" / "results" / "parity_cpu.csv"
# every kernel page, the `kernel` names its figure shows, and the quantities each must have (forward + input gradients)
PAGE_KERNELS = {
    "01_rmsnorm": {"rmsnorm": {"forward", "grad_x", "grad_weight"}},
    "02_cross_entropy": {"cross_entropy": {"forward", "grad_logits"},
                         "linear_cross_entropy": {"forward", "grad_hidden", "grad_weight"}},
    "10_flash_attention": {k: {"forward", "grad_q", "grad_k", "grad_v"} for k in ("flash_attention_causal", "flash_attention_docs")},
    "20_moe_experts": {"grouped_expert_ffn": {"forward", "grad_x", "grad_w_in", "grad_w_out", "grad_gates"}},
    "20a_moe_chunk": {"chunk_sparse_ffn": {"forward"}},  # forward only: its gradients are the dense PyTorch formula
    "40_unlearning_losses": {"generic_labels": {"labels_differing"}, "kl_div": {"forward", "grad_p", "grad_q"}},
}


def _parity_csv(path, rows):
    cols = ("kernel", "op", "quantity", "size", "numel", "max_abs_err", "tol_atol", "tol_rtol", "ref_err_vs_fp64")
    path.write_text("\n".join([",".join(cols)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_plot_parity_draws_and_names_bad_input(tmp_path):
    import matplotlib.pyplot as plt
    p = _parity_csv(tmp_path / "parity.csv", [
        ("toy", "toy", "forward", "4x8", 32, 1e-7, 1e-5, 1e-5, 2e-7), ("toy", "toy", "grad_x", "4x8", 32, 0.0, 1e-5, 1e-5, 2e-7),
        ("toy", "toy", "forward", "8x16", 128, 3e-7, 1e-5, 1e-5, 4e-7), ("toy", "toy", "grad_x", "8x16", 128, 2e-7, 1e-5, 1e-5, 4e-7),
        ("labels", "labels", "labels_differing", "4x8", 32, 0, 0.0, 0.0, 0)])
    fig = U.plot_parity(p, ["toy", "labels"])
    try:
        assert fig.get_size_inches()[0] <= 7 and len(fig.axes) == 2
        assert fig._suptitle.get_text() == "Triton (interpreter, CPU) vs PyTorch reference, fp32"
        ax, ax_labels = fig.axes
        assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["4x8", "8x16"]
        dashed = [l for l in ax.get_lines() if l.get_linestyle() == "--"]
        assert len(dashed) == 1 and dashed[0].get_ydata()[0] == 1e-5  # the test atol
        assert {"forward", "grad_x"} <= {l.get_label() for l in ax.get_lines()}
        assert ax_labels.get_yscale() == "linear"  # an exact kernel counts differing outputs
    finally:
        plt.close(fig)
    plt.close(U.plot_parity(p, "toy"))  # one name as a string
    with pytest.raises(ValueError, match=r"`kernels`: expected names from the CSV's `kernel` column \(toy, labels\), got 'rms_norm'"):
        U.plot_parity(p, ["toy", "rms_norm"])
    with pytest.raises(ValueError, match="`kernels`: expected at least one kernel name"):
        U.plot_parity(p, [])
    with pytest.raises(FileNotFoundError, match="`csv_path`: expected an existing parity CSV"):
        U.plot_parity(tmp_path / "missing.csv", "toy")
    (tmp_path / "other.csv").write_text("kernel,size\ntoy,4x8\n")
    with pytest.raises(ValueError, match="`csv_path`: expected a parity CSV with rows and the columns"):
        U.plot_parity(tmp_path / "other.csv", "toy")
    assert plt.get_fignums() == []


def test_parity_csv_covers_every_kernel_page_within_tolerance():
    "The committed kernels/results/parity_cpu.csv: every page's kernels and quantities, >= 3 sizes, every error within its test tolerance."
    rows = U.read_rows(PARITY_CSV)
    for page, kernels in PAGE_KERNELS.items():
        nb = (ROOT / "nbs" / "kernels" / f"{page}.ipynb").read_text()
        assert "What was measured" in nb and "GPU timings are pending" in nb, page
        for k, quantities in kernels.items():
            assert f'\\"{k}\\"' in nb, (page, k)  # the page's plot_parity call names it
            sel = [r for r in rows if r["kernel"] == k]
            assert {r["quantity"] for r in sel} == quantities, k
            assert len({r["size"] for r in sel}) >= 3, k
            for r in sel:
                err, atol, rtol = float(r["max_abs_err"]), float(r["tol_atol"]), float(r["tol_rtol"])
                assert r["dtype"] == "float32" and r["triton"] and r["torch"], r
                if atol == 0: assert err == 0, r  # exact kernels (integer labels): nothing may differ
                else:
                    assert float(r["err_over_tol"]) <= 1, r  # what torch.testing.assert_close checks, per element
                    assert err <= atol + rtol * float(r["ref_max_abs"]), r
    assert {r["kernel"] for r in rows} == {k for ks in PAGE_KERNELS.values() for k in ks}


def test_parity_tolerances_are_the_test_files():
    "The tolerances recorded in the CSV are the fp32 ones the kernel test files state."
    import importlib
    files = {"rmsnorm": "test_kernels_rmsnorm", "cross_entropy": "test_kernels_cross_entropy",
             "linear_cross_entropy": "test_kernels_cross_entropy", "flash_attention": "test_kernels_attention",
             "grouped_expert_ffn": "test_kernels_moe", "chunk_sparse_ffn": "test_kernels_moe", "kl_div": "test_kernels_unlearning"}
    for r in U.read_rows(PARITY_CSV):
        if r["op"] not in files: continue
        tol = importlib.import_module(files[r["op"]]).TOL[torch.float32]
        assert (float(r["tol_atol"]), float(r["tol_rtol"])) == (tol["atol"], tol["rtol"]), r
