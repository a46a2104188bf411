"""trainlab.stats against SciPy: means, t intervals of a mean, of a paired difference and of a ratio; verdicts; claims."""
import math
import numpy as np
import pytest
from scipy import stats as st

from trainlab.stats import (finite, mean, std, ci_mean, paired, ci_paired_diff, ci_ratio, verdict, Claim, fmt_claim, fmt_num)

rng = np.random.default_rng(0)
SAMPLES = [rng.normal(2.5, 0.1, n) for n in (2, 3, 5, 8, 20)]


@pytest.mark.parametrize("x", SAMPLES)
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_ci_mean_matches_scipy(x, level):
    lo, hi = ci_mean(x, level)
    ref = st.t.interval(level, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    assert mean(x) == pytest.approx(np.mean(x)) and std(x) == pytest.approx(np.std(x, ddof=1))


@pytest.mark.parametrize("n", [2, 3, 6, 15])
def test_paired_difference_matches_scipy_ttest_rel(n):
    a = rng.normal(2.6, 0.2, n); b = a - 0.03 + rng.normal(0, 0.01, n)
    est, lo, hi = ci_paired_diff(a, b)
    res = st.ttest_rel(a, b)
    ref = res.confidence_interval(0.95)
    assert est == pytest.approx(np.mean(a - b)) and (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-10)
    # the p-value of zero difference is below 0.05 exactly when the CI excludes 0
    assert (res.pvalue < 0.05) == (lo > 0 or hi < 0)


def test_ratio_is_a_t_interval_on_the_log_scale():
    a = rng.lognormal(1.0, 0.1, 6); b = rng.lognormal(0.5, 0.1, 6)
    r, lo, hi = ci_ratio(a, b)
    d = np.log(a) - np.log(b)
    ref = st.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=st.sem(d))
    assert r == pytest.approx(math.exp(d.mean())) and (lo, hi) == pytest.approx(tuple(np.exp(ref)), rel=1e-10)
    # unpaired: Welch's interval for the difference of log-means
    r2, lo2, hi2 = ci_ratio(a, b[:4], paired_seeds=False)
    w = st.ttest_ind(np.log(a), np.log(b[:4]), equal_var=False).confidence_interval(0.95)
    assert (lo2, hi2) == pytest.approx((math.exp(w.low), math.exp(w.high)), rel=1e-8)
    with pytest.raises(ValueError, match="positive"): ci_ratio([1.0, -1.0], [1.0, 1.0])


def test_missing_values_are_dropped_pairwise_not_imputed():
    assert finite([1, None, float("nan"), float("inf"), 2]).tolist() == [1.0, 2.0]
    a, b = paired([1.0, None, 3.0, 4.0], [2.0, 2.0, float("nan"), 5.0])
    assert a.tolist() == [1.0, 4.0] and b.tolist() == [2.0, 5.0]
    assert all(math.isnan(v) for v in ci_mean([1.0]))  # one seed: no interval
    with pytest.raises(ValueError, match="one value per seed"): paired([1, 2], [1])


@pytest.mark.parametrize("ci, direction, thr, want", [
    ((1.4, 2.0), ">", 1.3, "holds"), ((0.5, 1.2), ">", 1.3, "fails"), ((1.2, 1.4), ">", 1.3, "inconclusive"),
    ((-0.2, -0.1), "<", 0.0, "holds"), ((0.1, 0.2), "<", 0.0, "fails"), ((-0.1, 0.1), "<", 0.0, "inconclusive"),
    ((0.0, 0.2), ">", 0.0, "inconclusive"), ((math.nan, math.nan), "<", 0.0, "inconclusive"), ((None, None), ">", 0.0, "inconclusive"),
])
def test_verdict_reads_only_the_interval(ci, direction, thr, want):
    assert verdict(ci, direction, thr) == want


def test_claims_judge_per_seed_samples():
    samples = {"dd": {"bpb": [2.40, 2.42, 2.38], "t": [50.0, 52.0, 47.0]}, "cc": {"bpb": [2.50, 2.49, 2.51], "t": [100.0, 98.0, 105.0]}}
    diff = Claim("lower", "DD's bpb is lower.", "bpb", ("dd", "cc"), "diff", "<", 0.0).judge(samples)
    assert diff["verdict"] == "holds" and diff["n_seeds"] == 3 and diff["estimate"] == pytest.approx(-0.1, abs=1e-9)
    ratio = Claim("faster", "CC takes 1.3x longer.", "t", ("cc", "dd"), "ratio", ">", 1.3).judge(samples)
    assert ratio["verdict"] == "holds" and ratio["ci95"][0] > 1.3 and "x [" in fmt_claim(ratio)
    too_much = Claim("faster3", "CC takes 3x longer.", "t", ("cc", "dd"), "ratio", ">", 3.0).judge(samples)
    assert too_much["verdict"] == "fails"
    assert set(diff) >= {"name", "statement", "estimate", "ci95", "n_seeds", "threshold", "verdict"}
    assert Claim("m", "", "bpb", ("dd",), "mean", "<", 2.41).judge(samples)["verdict"] == "inconclusive"
    assert diff["verdict"] != Claim("lower", "", "bpb", ("dd", "cc"), "diff", "<", 0.0).judge(samples, tested=False)["verdict"]


def test_bad_claims_are_rejected_clearly():
    with pytest.raises(ValueError, match="comparison"): Claim("x", "", "m", ("a", "b"), "median")
    with pytest.raises(ValueError, match="direction"): Claim("x", "", "m", ("a", "b"), "diff", ">=")
    with pytest.raises(ValueError, match="arm name"): Claim("x", "", "m", ("a",), "ratio")
    with pytest.raises(ValueError, match="name"): Claim("not an id", "", "m", ("a",), "mean")
    with pytest.raises(ValueError, match="threshold"): Claim("x", "", "m", ("a",), "mean", ">", float("nan"))
    with pytest.raises(ValueError, match="metric 'm'"): Claim("x", "", "m", ("a",), "mean").judge({"a": {"other": [1.0]}})
    assert fmt_num(None) == "n/a" and fmt_num(float("inf")) == "n/a" and fmt_num(1234567) == "1,234,567"


def test_a_non_finite_seed_makes_a_claim_invalid_not_smaller():
    from trainlab.baseline import BASELINE_CLAIMS
    rec = BASELINE_CLAIMS[0].judge({"fp32": {"val_bpb": [1.95, float("nan"), 1.96, 1.94]}})
    assert rec["verdict"] == "invalid (seed 1: non-finite)" and rec["nonfinite"] == {"rule": "invalid", "seeds": [1]}
    assert rec["n_seeds"] == 3  # the estimate over the finite seeds is still recorded, for reading
    for bad in (None, float("inf"), float("-inf")):
        samples = {"a": {"m": [1.0, 2.0, bad]}, "b": {"m": [0.5, 1.0, 1.5]}}
        assert Claim("d", "", "m", ("a", "b"), "diff", ">", 0.0).judge(samples, seeds=[7, 8, 9])["verdict"] == \
            "invalid (seed 9: non-finite)"
    two = Claim("d", "", "m", ("a", "b"), "ratio", ">", 1.0).judge({"a": {"m": [None, 2.0, 3.0]}, "b": {"m": [1.0, None, 1.0]}})
    assert two["verdict"] == "invalid (seeds 0, 1: non-finite)"
    assert Claim("d", "", "m", ("a",), "mean").judge({"a": {"m": [None]}}, tested=False)["verdict"] == "not tested (--fast)"


def test_the_worst_rule_counts_a_non_finite_seed_against_the_claim():
    samples = {"new": {"t": [40.0, 50.0, None]}, "old": {"t": [100.0, 100.0, 100.0]}}  # new diverged on seed 2
    faster = Claim("faster", "", "t", ("old", "new"), "ratio", ">", 1.3, nonfinite="worst")
    vals = faster.worst_case(samples)
    assert vals[1].tolist() == [40.0, 50.0, 100.0]  # new must be low: its seed 2 counts at the largest value seen
    rec = faster.judge(samples)
    assert rec["n_seeds"] == 3 and rec["nonfinite"] == {"rule": "worst", "seeds": [2]}
    assert rec["estimate"] == pytest.approx(ci_ratio([100.0] * 3, [40.0, 50.0, 100.0])[0])
    assert rec["verdict"] == "inconclusive"  # while dropping seed 2 would have made it hold
    assert Claim("faster", "", "t", ("old", "new"), "ratio", ">", 1.3).judge({k: {"t": v["t"][:2]} for k, v in samples.items()})[
        "verdict"] == "inconclusive"  # (two seeds only: wide)
    low = Claim("low", "", "t", ("new",), "mean", "<", 60.0, nonfinite="worst")
    assert low.worst_case({"new": {"t": [40.0, float("nan"), 50.0]}})[0].tolist() == [40.0, 50.0, 50.0]
    assert low.judge({"new": {"t": [None, None]}})["verdict"] == "fails"  # nothing finite: nothing on the claim's side
    assert Claim("x", "", "t", ("new",), "mean", nonfinite="worst").judge({"new": {"t": [1.0, 2.0]}}).get("nonfinite") is None
    with pytest.raises(ValueError, match="nonfinite"): Claim("x", "", "t", ("new",), "mean", nonfinite="drop")
