"""The fp32-vs-bf16 bench script runs (quick mode: one tiny shape, nothing written) and reports a ratio with its CI."""
import importlib.util, math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_precision_quick_runs_side_by_side():
    spec = importlib.util.spec_from_file_location("bench_precision", ROOT / "kernels" / "bench_precision.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    try: rows = mod.main(["--quick", "--threads", "1"])
    finally: torch.set_num_threads(n)
    (r,) = rows
    assert r["fp32_ms"] > 0 and r["bf16_ms"] > 0 and r["speedup"] > 0
    assert r["speedup_lo"] <= r["speedup"] <= r["speedup_hi"] or math.isnan(r["speedup_lo"])
    assert abs(r["fp32_final_loss"] - r["bf16_final_loss"]) < 0.5  # same init, same batches: bf16 tracks fp32
    assert set(mod.SHAPES) == {"baseline", "moe", "curriculum", "spt", "unlearning"}


def test_bench_spt_step_quick_compares_the_three_paths():
    "SPT's pretraining step, plain `fit` and a bare loop, side by side (quick: the fast shape, nothing written)."
    spec = importlib.util.spec_from_file_location("bench_spt_step", ROOT / "kernels" / "bench_spt_step.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    try: rows = mod.main(["--quick", "--threads", "1"])
    finally: torch.set_num_threads(n)
    assert [r["ratio"] for r in rows] == ["spt/fit", "spt/bare", "fit/bare"]
    for r in rows:
        assert r["estimate"] > 0 and r["ms_num"] > 0 and r["ms_den"] > 0
        assert r["ci_lo"] <= r["estimate"] <= r["ci_hi"] or math.isnan(r["ci_lo"])
