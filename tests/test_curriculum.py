"""Dataset Decomposition, the curriculum samplers, loss reweighting and their Lightning wiring (incl. 2-process DDP)."""
import dataclasses
import math

import lightning as L
import numpy as np
import pytest
import torch

from trainlab.curriculum import (FULL_RUN_ARMS, Arm, Buckets, CurriculumArm, ChunkBatchSampler, CurriculumDataModule, CurriculumRunConfig, CURRICULUM_ARMS,
                                 CURRICULUM_CLAIMS, BASELINE_ARM, HEADLINE_ARM, DDBatchSampler, DDDataset, LossReweighter, StepLog,
                                 VarChunkDataset, arm_datamodule, censored_time_to_target, curriculum_fit, curriculum_odds, dd_schedule,
                                 decompose, estimate_run_seconds, evaluate_by_position, minmax_scale, paired_effects, reweight,
                                 step_seconds, steps_per_bucket, time_to_target, toy_regression, train_arm)
from trainlab.data import ByteTokenizer, PackedDataset, TokenizedCorpus, balanced_val_split, load_corpus, doc_eval_loader
from trainlab.model import ModelConfig, TinyLM
from trainlab.runconfig import arms_of, check_claim_arms, check_run_config
from trainlab.train import LMLitModule, TrainConfig, make_trainer

EOT = ByteTokenizer().eot_id


def _corpus(lengths, seed=0):
    rng = np.random.default_rng(seed)
    toks = [rng.integers(0, 256, n).astype(np.uint16) for n in lengths]
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(np.concatenate(toks) if toks else np.zeros(0, np.uint16), off, [f"d{i}" for i in range(len(lengths))])


@pytest.mark.parametrize("randomize", [True, False])
@pytest.mark.parametrize("lo,hi", [(0, 0), (0, 3), (3, 3), (5, 10), (2, 7)])
def test_decompose_tiles_every_document(randomize, lo, hi):
    rng = np.random.default_rng(lo * 31 + hi)
    lens = rng.integers(0, 3000, 80).tolist() + [0, 1, 2 ** lo - 1, 2 ** lo, 2 ** hi, 2 ** hi + 1, 2 ** (hi + 3) + 5]
    bk = decompose([[0] * n for n in lens], lo, hi, randomize=randomize, seed=7)
    covered = 0
    for d, m in enumerate(lens):
        pos = 0
        for s, l in bk.pieces(d):
            assert s == pos and l in bk.lengths
            pos += l
        assert 0 <= m - pos < 2 ** lo, (m, pos)  # only a remainder shorter than the smallest bucket is dropped
        if m < 2 ** (hi + 1):  # no over-long remainder: the binary expansion, one piece per set bit >= 2^lo, largest first
            assert [l for _, l in bk.pieces(d)] == [2 ** k for k in range(hi, lo - 1, -1) if (m >> k) & 1]
        covered += pos
    st = bk.stats()
    assert st["kept_tokens"] == covered and st["kept_tokens"] + st["dropped_tokens"] == sum(lens)
    assert sum(b["sequences"] for b in st["buckets"]) == len(bk)


def test_decompose_randomized_split_spreads_tokens_evenly():
    "Over-long remainders: P(k) ~ 2^(max-k), i.e. equal expected tokens per bucket."
    bk = decompose([range(2_000_000)], 5, 10, randomize=True, seed=0)
    share = np.array([b["token_share"] for b in bk.stats()["buckets"]])
    assert np.abs(share - 1 / 6).max() < 0.02, share
    det = decompose([range(2_000_000)], 5, 10, randomize=False).stats()
    assert det["buckets"][-1]["token_share"] > 0.99
    assert bk.stats()["attention_cost"] < 0.5 < det["attention_cost"]


def test_decompose_is_seeded_and_validates():
    a, b = decompose([range(50_000)] * 3, 5, 9, seed=1), decompose([range(50_000)] * 3, 5, 9, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.start, b.start))
    assert any(not np.array_equal(x, y) for x, y in zip(a.start, decompose([range(50_000)] * 3, 5, 9, seed=2).start))
    with pytest.raises(ValueError, match="max_log2"): decompose([[1]], 4, 3)
    with pytest.raises(ValueError, match="min_log2"): decompose([[1]], -1, 3)
    with pytest.raises(TypeError, match="docs"): decompose("text")
    with pytest.raises(TypeError, match="docs"): decompose([1, 2, 3])


def test_attention_cost_and_context_by_hand():
    bk = decompose([range(96)], 5, 6, randomize=False)  # 64 + 32
    st = bk.stats(fixed_len=64)
    assert st["attention_cost"] == pytest.approx((64 ** 2 + 32 ** 2) / (96 * 64))
    assert st["avg_context"] == pytest.approx((64 * 63 / 2 + 32 * 31 / 2) / 96)


def test_dd_dataset_items_are_the_document_stream():
    c = _corpus([5, 100, 1500, 33])
    bk = decompose(c, 2, 6, seed=3)
    ds = DDDataset(c, bk, EOT)
    seen = {}
    for i in range(len(ds)):
        it = ds[i]
        b, j = ds.locate(i)
        d, s, n = bk.doc[b][j], bk.start[b][j], bk.lengths[b]
        doc = c.doc(d).astype(np.int64)
        stream = np.concatenate([[EOT], doc])
        assert np.array_equal(it["input_ids"].numpy(), stream[s:s + n]) and np.array_equal(it["labels"].numpy(), doc[s:s + n])
        assert it["index"] == i
        for p in range(s, s + n): assert seen.setdefault((d, p), i) == i  # every target token predicted once
    assert len(seen) == bk.stats()["kept_tokens"]
    with pytest.raises(IndexError): ds[len(ds)]
    with pytest.raises(ValueError, match="buckets"): DDDataset(_corpus([5, 100]), bk, EOT)


def test_odds_and_schedule():
    assert curriculum_odds("grow_p2", 4).tolist() == [8, 4, 2, 1] and curriculum_odds("grow_linear", 3).tolist() == [3, 2, 1]
    assert curriculum_odds([1, 2], 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="curriculum"): curriculum_odds([1, 0], 2)
    with pytest.raises(ValueError, match="curriculum"): curriculum_odds("shrink", 2)
    counts = np.array([30, 20, 20, 10, 0, 40])
    for cycles in (1, 3, 7):
        s = dd_schedule(counts, curriculum_odds("grow_p2", 6), cycles, seed=1)
        assert np.array_equal(np.bincount(s, minlength=6), counts)
        # each cycle holds its share of every bucket
        cut = np.cumsum([sum(c // cycles + (k < c % cycles) for c in counts) for k in range(cycles)])[:-1]
        for k, part in enumerate(np.split(s, cut)):
            assert np.array_equal(np.bincount(part, minlength=6), counts // cycles + (k < counts % cycles))
    s = dd_schedule(counts, curriculum_odds("grow_p2", 6), 1, seed=1)
    assert s[:30].mean() < s[-30:].mean()  # grows: short buckets first
    assert np.array_equal(s, dd_schedule(counts, curriculum_odds("grow_p2", 6), 1, seed=1))
    assert np.array_equal(np.bincount(dd_schedule(counts, np.ones(6), 2, seed=0, weighting="size"), minlength=6), counts)
    with pytest.raises(ValueError, match="weighting"): dd_schedule(counts, np.ones(6), weighting="random")


def test_steps_per_bucket():
    bk = decompose([range(100_000)] * 4, 5, 10, seed=0)
    for steps in (1, 7, 300):
        c = steps_per_bucket(bk, 4096, steps)
        assert c.sum() == steps
    c = steps_per_bucket(bk, 4096, 6000)
    tok = bk.counts * np.array(bk.lengths)
    assert np.allclose(c / c.sum(), tok / tok.sum(), atol=1e-3)
    small = decompose([range(40)], 5, 6, randomize=False)  # one piece of 32: can't fill 64 tokens
    with pytest.raises(ValueError, match="tokens_per_step"): steps_per_bucket(small, 64, 3)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dd_batch_sampler_shards_like_ddp(world):
    bk = decompose(_corpus([3000, 7000, 12000, 900]), 4, 7, seed=0)
    ds = DDDataset(_corpus([3000, 7000, 12000, 900]), bk, EOT)
    full = list(DDBatchSampler(bk, 512, 40, "grow_linear", cycles=2, seed=4, rank=0, world_size=1))
    parts = [list(DDBatchSampler(bk, 512, 40, "grow_linear", cycles=2, seed=4, rank=r, world_size=world)) for r in range(world)]
    assert all(len(p) == 40 for p in parts)
    for step, g in enumerate(full):
        batches = [p[step] for p in parts]
        assert len({ds.locate(i)[0] for b in batches for i in b}) == 1  # the same bucket on every rank
        flat = [i for b in batches for i in b]
        assert sorted(flat) == sorted(g) and len(set(flat)) == len(flat)  # disjoint, together the global batch
        assert sum(ds[i]["labels"].numel() for i in flat) == 512  # fixed tokens per step
    s = DDBatchSampler(bk, 512, 40, "grow_linear", cycles=2, seed=4, rank=0, world_size=1)
    first = list(s); s.set_epoch(1)
    assert list(s) != first and len(s) == 40
    with pytest.raises(ValueError, match="tokens_per_step"): list(DDBatchSampler(bk, 128, 4, rank=0, world_size=2))


def test_dd_sampler_draws_without_replacement_within_a_bucket():
    bk = decompose(_corpus([20000] * 3), 4, 6, seed=0)
    s = DDBatchSampler(bk, 256, 30, "uniform", seed=0, rank=0, world_size=1)
    seen = [i for b in s for i in b]
    assert len(seen) == len(set(seen))  # 30 steps use far fewer pieces than each bucket holds: no repeats


def test_chunk_batch_sampler():
    full = list(ChunkBatchSampler(50, 8, 12, seed=2, rank=0, world_size=1))
    parts = [list(ChunkBatchSampler(50, 8, 12, seed=2, rank=r, world_size=2)) for r in (0, 1)]
    for g, a, b in zip(full, *parts):
        assert sorted(a + b) == sorted(g) and not set(a) & set(b) and len(a) == len(b) == 4
    first48 = [i for b in full[:6] for i in b]
    assert len(set(first48)) == 48  # one permutation before any window repeats
    with pytest.raises(ValueError, match="batch_size"): ChunkBatchSampler(5, 8, 1)
    with pytest.raises(ValueError, match="batch_size"): list(ChunkBatchSampler(50, 3, 1, rank=0, world_size=2))


def test_reweight_strategies_match_their_formulas():
    torch.manual_seed(0)
    x = torch.rand(17, dtype=torch.float64) * 5
    h = (x - x.min()) / (x.max() - x.min()) * 2 - 1
    for s, f in {"linupper": torch.clamp(h + 1, max=1), "quadratic": 1 - h ** 2, "extremes": h.abs(), "upper": 0.5 * h + 0.5}.items():
        for r in (0.4, 1.0, 3.0):
            w = reweight(x, s, r)
            assert torch.allclose(w, torch.exp((f - f.max()) / r) / torch.exp((f - f.max()) / r).sum())
            assert w.sum().item() == pytest.approx(1.0)
    assert torch.allclose(minmax_scale(x, 2.0).aminmax()[0], torch.tensor(-2.0, dtype=torch.float64))
    assert torch.equal(reweight(torch.ones(3), "linupper"), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="temperature"): reweight(x, "linupper", 0)
    with pytest.raises(ValueError, match="losses"): reweight(torch.zeros(0), "linupper")
    with pytest.raises(ValueError, match="anneal_steps"): LossReweighter("annealed")


def test_weighted_lm_loss_is_the_global_weighted_mean():
    "LMLitModule with a LossReweighter: loss = sum_j softmax-weight_j * mean-loss_j."
    torch.manual_seed(0)
    lit = LMLitModule(TinyLM(ModelConfig(d_model=32, n_layers=1, n_heads=1, max_seq_len=32)), sample_weighter=LossReweighter("linupper", 0.5))
    x = torch.randint(0, 256, (6, 16))
    batch = dict(input_ids=x, labels=x)
    out = lit._run(batch)
    loss, per_seq = lit.lm_loss(out, batch)
    w = reweight(per_seq.detach(), "linupper", 0.5)
    assert torch.allclose(loss, (w * per_seq).sum(), atol=1e-6)
    assert lit.sample_weighter.last_global.mean().item() == pytest.approx(1.0)
    lit.sample_weighter = LossReweighter("linupper", 0.5, burn_in_steps=10)  # burn-in: the plain mean
    assert torch.allclose(lit.lm_loss(out, batch)[0], per_seq.mean(), atol=1e-6)


def test_toy_regression_runs_and_linupper_helps():
    c = toy_regression(("uniform", "linupper"), steps=150, seeds=(0, 1))
    assert len(c["uniform"]) == 150 and all(math.isfinite(v) for v in c["linupper"])
    assert c["linupper"][-1] < c["uniform"][-1]  # the mechanism: redundant low-loss samples down-weighted


def test_time_to_target():
    assert time_to_target([(0, 4.0), (10, 2.0), (20, 1.0)], 3.0) == 5.0
    assert time_to_target([(0, 4.0), (10, 2.0), (20, 1.0)], 2.0) == 10.0
    assert time_to_target([(3, 1.0), (10, 0.5)], 2.0) == 3.0
    assert time_to_target([(0, 4.0), (10, 2.5), (20, 3.0)], 2.0) is None


def test_censored_time_to_target_never_drops_a_run():
    "A curve that misses the target keeps its last time (a lower bound), flagged; one that reaches it is unchanged."
    assert censored_time_to_target([(0, 4.0), (10, 2.0), (20, 1.0)], 3.0) == (5.0, True)
    assert censored_time_to_target([(0, 4.0), (10, 2.5), (20, 3.0)], 2.0) == (20.0, False)
    with pytest.raises(ValueError, match="points"): censored_time_to_target([], 2.0)


def test_arm_registry():
    a = CURRICULUM_ARMS["dd_grow_p2_c8"]
    assert (a.mode, a.curriculum, a.cycles, a.exploratory) == ("dd", "grow_p2", 8, False)  # the headline arm, in the claims
    assert (HEADLINE_ARM, BASELINE_ARM) == ("dd_grow_p2_c8", "cc_long")
    assert CURRICULUM_ARMS["cc_long_docmask"].doc_mask and CURRICULUM_ARMS["cc_short"].short
    rc = CurriculumRunConfig.full()
    assert a.data_kwargs(rc) == dict(mode="dd", min_log2=5, max_log2=10, curriculum="grow_p2", cycles=8)
    assert CURRICULUM_ARMS["cc_short"].data_kwargs(rc) == dict(mode="cc", seq_len=128, doc_mask=False)
    claim_arms = {x for c in CURRICULUM_CLAIMS for x in c.arms}
    assert claim_arms == {"cc_long", "dd_grow_p2_c8", "cc_dd_lengths", "defs_cc_long", "defs_cc_long_docmask"}
    every_seed = {k for k, x in CURRICULUM_ARMS.items() if not x.exploratory}
    assert every_seed == claim_arms  # every arm of a claim, and no other, trains on every seed
    assert set(FULL_RUN_ARMS) == every_seed | {"dd_uniform_c1", "cc_short"}
    # horizons: the headline pair and its ablation long, the short-document pair and the reweighting base short
    assert {k for k, x in CURRICULUM_ARMS.items() if x.horizon == "short"} == {"defs_cc_long", "defs_cc_long_docmask", "cc_short"}
    # the ablation: C&C on the headline arm's schedule; the control: the masked code path with nothing masked
    v = CURRICULUM_ARMS["cc_dd_lengths"]
    assert (v.mode, v.curriculum, v.cycles, v.vs, v.exploratory) == ("cc_var", a.curriculum, a.cycles, HEADLINE_ARM, False)
    assert v.data_kwargs(rc) == dict(mode="cc_var", min_log2=5, max_log2=10, curriculum="grow_p2", cycles=8)
    z = CURRICULUM_ARMS["cc_long_zero_docids"]
    assert z.data_kwargs(rc) == dict(mode="cc", seq_len=1024, doc_mask=False, zero_doc_ids=True) and z.attention == "masked_path"
    assert {k: x.corpus for k, x in CURRICULUM_ARMS.items() if x.corpus} == {"defs_cc_long": "stdlib_defs", "defs_cc_long_docmask": "stdlib_defs"}
    assert all(x.vs is None or x.vs in CURRICULUM_ARMS for x in CURRICULUM_ARMS.values())
    assert len({x.color for x in CURRICULUM_ARMS.values()}) == len(CURRICULUM_ARMS)  # every arm its own colour
    for bad in ("dd_shrink_c1", "dd_uniform", "cc_medium"):
        with pytest.raises(ValueError, match="arm"): arm_datamodule(bad, rc)
    with pytest.raises(ValueError, match="curriculum"):
        CurriculumArm("dd", curriculum="shrink")
    with pytest.raises(ValueError, match="cycles"):
        CurriculumArm("dd", cycles=0)
    with pytest.raises(ValueError, match="zero_doc_ids"):
        CurriculumArm("cc", doc_mask=True, zero_doc_ids=True)
    with pytest.raises(ValueError, match="doc_mask"):
        CurriculumArm("cc_var", doc_mask=True)
    with pytest.raises(ValueError, match="horizon"):
        CurriculumArm("cc", horizon="medium")
    assert Arm is CurriculumArm  # the earlier name


def test_arms_are_registered_with_roles():
    "Every arm in the one arm registry, in the order of the lookup table, with its role; claims use none exploratory."
    reg = arms_of("curriculum")
    assert list(reg) == list(CURRICULUM_ARMS) and all(reg[k].spec is a for k, a in CURRICULUM_ARMS.items())
    roles = {k: a.role for k, a in reg.items()}
    assert {k for k, r in roles.items() if r == "method"} == {"dd_grow_p2_c8", "defs_cc_long_docmask"}
    assert {k for k, r in roles.items() if r == "baseline"} == {"cc_long", "cc_short", "defs_cc_long"}
    assert (roles["cc_dd_lengths"], roles["cc_long_zero_docids"]) == ("ablation", "control")
    assert all(CURRICULUM_ARMS[k].exploratory for k, r in roles.items() if r == "exploratory")  # first seed only
    assert all(a.description for a in reg.values())
    assert check_claim_arms("curriculum", CURRICULUM_CLAIMS) == CURRICULUM_CLAIMS


def test_run_config_presets_and_seed():
    "One run-config API: `full(seed)`, `fast(seed)`, `preset(fast, seed)`, and `with_seed` the one way to change the seed."
    assert check_run_config(CurriculumRunConfig) is CurriculumRunConfig
    assert CurriculumRunConfig.seed_field == "train.seed"
    assert CurriculumRunConfig.full() == CurriculumRunConfig()  # the field defaults are the full run
    assert CurriculumRunConfig.full(7) == CurriculumRunConfig.full().with_seed(7) and CurriculumRunConfig.full(7).run_seed == 7
    fast = CurriculumRunConfig.fast(3)
    assert (fast.train.seed, fast.train.steps, fast.long_len) == (3, 6, 256)
    assert CurriculumRunConfig.preset(True, 3) == fast
    assert "seed_field" not in dataclasses.asdict(fast)  # the recorded config is unchanged
    with pytest.raises(ValueError, match="seed"):
        CurriculumRunConfig.fast(0).with_seed(-1)


def test_claims_as_registered():
    "The pre-registered claims: metric, arms, comparison, direction, threshold (changing one is a new registration)."
    got = [(c.name, c.metric, c.arms, c.comparison, c.direction, c.threshold) for c in CURRICULUM_CLAIMS]
    assert got == [("dd_time_to_target", "time_to_target_censored_s", ("cc_long", "dd_grow_p2_c8"), "ratio", ">", 1.3),
                   ("dd_beats_cc_dd_lengths", "time_to_target_censored_s", ("cc_dd_lengths", "dd_grow_p2_c8"), "ratio", ">", 1.0),
                   ("dd_long_positions", "val_bpb_long", ("dd_grow_p2_c8", "cc_long"), "diff", "<", 0.0),
                   ("docmask_helps_short_docs", "val_bpb", ("defs_cc_long_docmask", "defs_cc_long"), "diff", "<", 0.0)]
    assert "censored" in CURRICULUM_CLAIMS[0].statement and "target_missed_n" in CURRICULUM_CLAIMS[0].statement
    # a censored seed counts: the ratio is judged over every seed, not only those where DD reached the target
    samples = {"cc_long": {"time_to_target_censored_s": [100.0, 100.0, 100.0]},
               "dd_grow_p2_c8": {"time_to_target_censored_s": [40.0, 50.0, 90.0]}}  # the last one censored
    assert CURRICULUM_CLAIMS[0].judge(samples)["n_seeds"] == 3


def test_paired_effects():
    r = lambda seed, v: dict(seed=seed, val_bpb=v, val_bpb_long=None, val_bpb_packed=v, tokens_per_s=10.0)
    e = paired_effects({"cc_long": [r(0, 2.0), r(1, 2.2)], "cc_long_docmask": [r(0, 2.1), r(1, 2.4)], "defs_cc_long_docmask": [r(0, 1.0)]})
    assert set(e) == {"cc_long_docmask"} and e["cc_long_docmask"]["vs"] == "cc_long"
    assert e["cc_long_docmask"]["diff"]["val_bpb"] == pytest.approx([0.1, 0.2]) and e["cc_long_docmask"]["diff"]["val_bpb_long"] == [None, None]
    assert e["cc_long_docmask"]["val_bpb_diff"] == pytest.approx(0.15)


def test_run_config_embeds_train_config():
    rc = CurriculumRunConfig.full()
    assert isinstance(rc.train, TrainConfig) and (rc.long_len, rc.max_log2, rc.tokens_per_step, rc.train.steps) == (1024, 10, 8192, 1000)
    short = rc.for_arm("defs_cc_long").train  # the short horizon: 200 steps, the same share of warm-up
    assert (short.steps, short.val_every, short.warmup_steps) == (200, 40, 20) and short.replace(steps=1000, val_every=100, warmup_steps=100) == rc.train
    assert rc.train.tokens == rc.train.steps * rc.tokens_per_step and rc.train.precision == "32-true"
    r2 = CurriculumRunConfig(train=rc.train.replace(precision="bf16-mixed", impl="torch"))
    assert (r2.train.precision, r2.train.impl) == ("bf16-mixed", "torch")
    assert rc.arms == FULL_RUN_ARMS and rc.arms_on(1) == [a for a in rc.arms if not CURRICULUM_ARMS[a].exploratory]
    assert rc.corpora == ("stdlib_code", "stdlib_defs")
    assert rc.with_seed(5).train.seed == 5 and rc.train.seed == 0
    assert CurriculumRunConfig(**dataclasses.asdict(rc)) == rc  # rebuilt from its recorded fields
    for kw, arg in ((dict(train=TrainConfig(seq_len=1000)), "train.seq_len"), (dict(short_len=96), "short_len"),
                    (dict(arms=("cc_long",)), "arms"), (dict(reweight_strategies=("nope",)), "reweight_strategies"),
                    (dict(long_from=4096), "long_from"), (dict(exploratory_seeds=0), "exploratory_seeds"),
                    (dict(max_eval_tokens=0), "max_eval_tokens"), (dict(val_max_share=0), "val_max_share"),
                    (dict(reweight_seeds=2), "reweight_seeds"), (dict(burn_in_frac=1.0), "burn_in_frac"),
                    (dict(short_val_every=500), "short_val_every"),
                    (dict(short_steps=0), "short_steps")):
        with pytest.raises(ValueError, match=arg): CurriculumRunConfig(**kw)
    # the bigger validation set, uncapped
    assert (rc.val_min_tokens, rc.val_max_share, rc.max_eval_tokens) == (200_000, 0.2, None)
    # reweighting at the authors' setting: Quadratic, r = 1.0, 5% burn-in, on the first seed, short horizon
    assert (rc.reweight_strategies, rc.reweight_temperature, rc.burn_in_frac, rc.reweight_seeds) == (("quadratic",), 1.0, 0.05, 1)
    assert [rc.reweight_on(i) for i in range(3)] == [["quadratic"], [], []]
    base = rc.for_arm(rc.reweight_base)
    w = base.reweighter("quadratic")
    assert (w.strategy, w.burn_in_steps, w.temperature) == ("quadratic", 10, 1.0)  # 5% of 200 steps
    w = base.reweighter("annealed")
    assert (w.strategy, w.burn_in_steps, w.anneal_steps, w.temperature) == ("annealed", 10, 100, 1.0)


def test_budget_estimate_fits_two_sittings():
    "The registered full run is sized to an estimate of at most two 55-minute sittings (2 threads)."
    assert step_seconds(1024, 8192, overhead=1.0) == pytest.approx(0.449)  # measured through fit at 8,192 tokens, 2 threads
    assert step_seconds(1024, 8192, "docmask", overhead=1.0) == pytest.approx(0.675)
    assert step_seconds(1024, 8192, "masked_path", overhead=1.0) == pytest.approx(0.810)
    assert step_seconds(128, 16_384) == pytest.approx(2 * 0.302 * 1.05)  # linear in tokens, plus 5%
    rc = CurriculumRunConfig.full()
    est = estimate_run_seconds(rc, 3)
    assert est["total_s"] <= 2 * 55 * 60, est["total_s"] / 60
    n_units = sum(len(rc.arms_on(i)) + len(rc.reweight_on(i)) for i in range(3))
    assert len(est["units"]) == n_units == 3 * 5 + 2 + 1
    # a short-horizon unit costs a fifth of the steps of its long-horizon twin (same arm spec otherwise)
    assert est["units"]["defs_cc_long/seed0"] < est["units"]["cc_long/seed0"] / 3


@pytest.fixture(scope="module")
def tiny_split():
    return balanced_val_split(load_corpus("stdlib_prose", "all"), 8192)


def test_datamodule_modes(tiny_split):
    dm = CurriculumDataModule(tiny_split, mode="cc", tokens_per_step=512, num_steps=3, seq_len=64, eval_window=64, max_eval_tokens=2048)
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (8, 64) and "doc_ids" not in b
    dm = CurriculumDataModule(tiny_split, mode="cc", tokens_per_step=512, num_steps=3, seq_len=64, doc_mask=True)
    assert "doc_ids" in next(iter(dm.train_dataloader()))
    dm = CurriculumDataModule(tiny_split, mode="dd", tokens_per_step=512, num_steps=20, min_log2=3, max_log2=6, curriculum="grow_p2")
    shapes = [tuple(b["input_ids"].shape) for b in dm.train_dataloader()]
    assert len(shapes) == 20 and all(B * Lq == 512 for B, Lq in shapes) and len(set(shapes)) > 1
    dm = CurriculumDataModule(tiny_split, mode="cc", tokens_per_step=512, num_steps=3, seq_len=64, zero_doc_ids=True)
    b = next(iter(dm.train_dataloader()))
    assert b["doc_ids"].shape == (8, 64) and not b["doc_ids"].any()
    for kw, arg in ((dict(mode="xx"), "mode"), (dict(mode="dd", doc_mask=True), "doc_mask"), (dict(mode="cc", seq_len=100), "tokens_per_step"),
                    (dict(mode="dd", curriculum="fast"), "curriculum"), (dict(mode="dd", cycles=0), "cycles"),
                    (dict(mode="cc_var", zero_doc_ids=True), "doc_mask"), (dict(mode="cc", doc_mask=True, zero_doc_ids=True), "zero_doc_ids")):
        with pytest.raises(ValueError, match=arg): CurriculumDataModule(tiny_split, **kw)


def test_var_chunk_windows_follow_the_dd_schedule(tiny_split):
    "cc_var: the DD arm's length and batch size at every step, but windows of the packed stream (across documents)."
    kw = dict(tokens_per_step=512, num_steps=30, min_log2=3, max_log2=6, curriculum="grow_p2", cycles=3, seed=2)
    dd = [b["input_ids"].shape for b in CurriculumDataModule(tiny_split, mode="dd", **kw).train_dataloader()]
    dm = CurriculumDataModule(tiny_split, mode="cc_var", **kw)
    var = list(dm.train_dataloader())
    assert [b["input_ids"].shape for b in var] == dd and len(set(dd)) > 1
    ds = dm.train_dataloader().dataset
    assert isinstance(ds, VarChunkDataset) and ds.lengths == [8, 16, 32, 64]
    stream = PackedDataset(tiny_split[0], 64, EOT).stream.astype(np.int64)
    for b in var[:5]:  # every window is a run of the packed stream at a multiple of its length
        for i, x, y in zip(b["index"].tolist(), b["input_ids"], b["labels"]):
            k = int(np.searchsorted(ds.offsets, i, side="right") - 1); n = ds.lengths[k]; s = (i - int(ds.offsets[k])) * n
            assert np.array_equal(x.numpy(), stream[s:s + n]) and np.array_equal(y.numpy(), stream[s + 1:s + n + 1])
    crossing = sum(int((b["input_ids"][:, 1:] == EOT).any(1).sum()) for b in var)
    assert crossing > 0  # some windows run across a document boundary: no single-document pieces


def test_zero_doc_ids_mask_nothing():
    "The masked code path with all-zero doc_ids computes the plain causal model (up to rounding)."
    torch.manual_seed(0)
    m = TinyLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    x = torch.randint(0, 256, (3, 48))
    a = m(x, labels=x).loss
    b = m(x, labels=x, doc_ids=torch.zeros_like(x)).loss
    assert torch.allclose(a, b, atol=1e-5)


def test_evaluate_by_position_matches_lightning_validation(tiny_split):
    torch.manual_seed(0)
    lit = LMLitModule(TinyLM(ModelConfig(d_model=32, n_layers=1, n_heads=1, max_seq_len=128)))
    dm = CurriculumDataModule(tiny_split, mode="cc", tokens_per_step=256, num_steps=2, seq_len=128, eval_window=128, max_eval_tokens=3000)
    v = make_trainer(1, accelerator="cpu").validate(lit, datamodule=dm, verbose=False)[0]["val/bpb"]
    r = evaluate_by_position(lit.model, dm.val_dataloader(), dm.tokenizer.byte_lengths, buckets=((0, 32), (32, 100), (100, None)))
    assert r["all"] == pytest.approx(v, rel=1e-5)
    assert set(r) == {"all", "0-31", "32-99", "100+"}
    assert min(r["0-31"], r["32-99"], r["100+"]) <= r["all"] <= max(r["0-31"], r["32-99"], r["100+"])


class _RanksAgree(L.Callback):
    "Fails the run unless every rank trains on the same length, on disjoint sequences, with the same global weights."
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        B, Lq = batch["input_ids"].shape
        g = trainer.strategy.all_gather(torch.tensor([B, Lq]))
        assert torch.equal(g[0], g[1]), f"ranks disagree on the batch shape: {g.tolist()}"
        idx = trainer.strategy.all_gather(batch["index"])
        assert not set(idx[0].tolist()) & set(idx[1].tolist()), "ranks share sequences"
        w = pl_module.sample_weighter.last_global
        gw = trainer.strategy.all_gather(w)
        assert torch.allclose(gw[0], gw[1]) and abs(float(w.mean()) - 1) < 1e-5, "global weights differ across ranks"
        pl_module.log("train/global_tokens", float(B * Lq * trainer.world_size))


@pytest.mark.parametrize("mode", ["dd", "cc_docmask"])
def test_ddp_two_processes(mode, tiny_split):
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=1, max_seq_len=64), steps=6, warmup_steps=1, batch_size=4, seq_len=64, val_every=6)
    lit = LMLitModule(cfg.model, **cfg.lit_kwargs(), sample_weighter=LossReweighter("linupper", 0.4, burn_in_steps=1))
    kw = dict(tokens_per_step=cfg.batch_size * cfg.seq_len, num_steps=cfg.steps, eval_window=64, max_eval_tokens=2048)
    dm = (CurriculumDataModule(tiny_split, mode="dd", min_log2=3, max_log2=6, curriculum="grow_p2", cycles=2, **kw) if mode == "dd"
          else CurriculumDataModule(tiny_split, mode="cc", seq_len=64, doc_mask=True, **kw))
    before = [p.detach().clone() for p in lit.model.parameters()]
    lit, _, trainer = curriculum_fit(cfg, lit, dm, callbacks=[_RanksAgree()], accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert trainer.world_size == 2  # (ddp_spawn does not send global_step back to this process)
    assert float(trainer.callback_metrics["train/global_tokens"]) == 256
    assert math.isfinite(float(trainer.callback_metrics["val/bpb"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, lit.model.parameters()))


def test_train_arm_is_paired_and_deterministic(tiny_split):
    "Through `fit`: fixed tokens per step, the long-position metric, and the same seed giving the same run."
    rc = CurriculumRunConfig.fast()
    a, b = (train_arm("dd_grow_p2_c8", rc, tiny_split) for _ in range(2))
    assert a["tokens"] == rc.train.tokens and a["seed"] == rc.train.seed
    assert a["val_bpb"] == b["val_bpb"] and a["val_bpb_long"] == b["val_bpb_long"]
    assert math.isfinite(a["val_bpb_long"]) and a["val_bpb_by_position"]["128-511"] == pytest.approx(a["val_bpb_long"])  # 256-token windows
    assert len(a["steps"]) == rc.train.steps and {L for L, _ in a["steps"]} <= {32, 64, 128, 256}
    assert a["val_bpb_short_window"] is None and a["eval_window"] == rc.eval_window and a["corpus"] == rc.corpus
    s = train_arm("cc_short", rc, tiny_split, eval_window=rc.short_len)  # scored on windows of its training length
    assert s["eval_window"] == rc.short_len and s["val_bpb_short_window"] == s["val_bpb_docwise_check"] and s["val_bpb_long"] is None
    c = train_arm("dd_grow_p2_c8", rc.with_seed(1), tiny_split, short_window=True)
    assert c["val_bpb"] != a["val_bpb"] and c["seed"] == 1 and math.isfinite(c["val_bpb_short_window"])


def test_step_log_state_survives_a_checkpoint():
    s = StepLog(); s.rows = [dict(step=1, seq_len=64, batch=4, seconds=0.1)]
    t = StepLog(); t.load_state_dict(s.state_dict())
    assert t.rows == s.rows
