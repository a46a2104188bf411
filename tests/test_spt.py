"Specialized pretraining: domain sets, the exact mixture, grouped per-source metrics, finetuning, the overfitting law, DDP."
import math

import lightning as L
import numpy as np
import pytest
import torch

from trainlab.data import Document, TokenizedCorpus, ByteTokenizer, split_corpus
from trainlab.model import ModelConfig, TinyLM
from trainlab.stats import Claim
from trainlab.train import TrainConfig
from trainlab.runconfig import arm_specs, arms_of, check_run_config
from trainlab.spt import (SPT_ARMS, SPT_CLAIMS, SPT_DOMAINS, SPT_MAIN, SPT_REF, DomainData, GlobalBatchSampler, KeepBest, MixtureDataModule,
                          MixtureDataset, SPTConfig, SPTLitModule, SPTRunConfig, FinetuneConfig, Snapshots, b_gap, domain_summary, effective_data,
                          evaluate_groups, finetune, finetune_grid, fit_muennighoff, fit_overfitting_law, general_eval_set, interp_log_tokens,
                          law_test, law_train, make_domain, mixture_plan, muennighoff_test, observed_turn, predicted_turn, pretrain,
                          pair_pretrain, spt_run_config)

TOK = ByteTokenizer()


def _docs(n_docs=12, lines=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["ALPHA", "BETA", "GAMMA", "DELTA", "SIGN", "LETTER", "SMALL", "CAPITAL", "WITH", "MARK"]
    return [Document(f"page{d:02d}", "".join(f"{d:02X}{i:02X} " + " ".join(rng.choice(words, 3)) + "\n" for i in range(lines)))
            for d in range(n_docs)]


@pytest.fixture(scope="module")
def domain():
    return make_domain(_docs(), train_tokens=1500, test_tokens=600, lines_per_piece=4, seed=0, name="toy")


@pytest.fixture(scope="module")
def general():
    rng = np.random.default_rng(1)
    docs = [Document(f"g{i}", "def f%d(x):\n    return x * %d\n" % (i, rng.integers(100)) * 30) for i in range(40)]
    return split_corpus(TokenizedCorpus.from_documents(docs, TOK), val_frac=0.2)


def test_make_domain_splits_by_source_and_meets_budgets(domain):
    card = domain.card()
    assert card["shared_sources"] == 0 and card["train_sources"] >= 2 and card["test_sources"] >= 1
    assert card["train_tokens"] >= 1500 and card["test_tokens"] >= 600
    # every piece is a run of whole lines from one source, and its id names that source
    for split, srcs in ((domain.train, domain.train_sources), (domain.test, domain.test_sources)):
        for i in range(len(split)):
            assert split.ids[i].split(":")[0] in srcs
            assert TOK.decode(split.doc(i).tolist()).endswith("\n")
    again = make_domain(_docs(), train_tokens=1500, test_tokens=600, lines_per_piece=4, seed=0)
    assert again.train.ids == domain.train.ids and np.array_equal(again.train.tokens, domain.train.tokens)
    other = make_domain(_docs(), train_tokens=1500, test_tokens=600, lines_per_piece=4, seed=1)
    assert other.train.ids != domain.train.ids


def test_make_domain_errors():
    with pytest.raises(ValueError, match="too small"): make_domain(_docs(3, 10), train_tokens=10_000, test_tokens=100)
    with pytest.raises(ValueError, match="train_tokens"): make_domain(_docs(), train_tokens=0)
    with pytest.raises(ValueError, match="source"): make_domain(_docs(1), train_tokens=10, test_tokens=10)
    with pytest.raises(TypeError, match="source"): make_domain(["not a document"], train_tokens=10)


def test_general_eval_set_is_what_the_datamodule_evaluates(domain, general):
    dm = MixtureDataModule(domain, general=general, delta=0.1, num_steps=4, batch_size=8, seq_len=32, max_general_eval_tokens=1024)
    dm.setup()
    assert dm.general_eval.ids == general_eval_set(general[1], 1024).ids and dm.general_eval.n_tokens <= 1024


@pytest.mark.parametrize("n,delta,start", [(9600, 0.02, 0.0), (1000, 0.001, 0.0), (777, 0.1, 0.0), (500, 0.3, 0.5), (64, 1.0, 0.0), (100, 0.0, 0.9)])
def test_mixture_plan_is_exact_and_stratified(n, delta, start):
    plan = mixture_plan(n, delta, start, seed=3)
    k = round(delta * n)
    assert plan.sum() == k
    first = math.floor(start * n)
    assert not plan[:first].any()
    if k:
        edges = first + (np.arange(k + 1) * (n - first)) // k
        assert all(plan[a:b].sum() == 1 for a, b in zip(edges[:-1], edges[1:]))  # exactly one per stratum
    assert np.array_equal(plan, mixture_plan(n, delta, start, seed=3))


def test_mixture_plan_errors():
    with pytest.raises(ValueError, match="delta"): mixture_plan(100, 1.5)
    with pytest.raises(ValueError, match="delta"): mixture_plan(100, 0.5, domain_start=0.9)
    with pytest.raises(ValueError, match="domain_start"): mixture_plan(100, 0.1, domain_start=1.0)
    with pytest.raises(ValueError, match="num_sequences"): mixture_plan(0, 0.1)


def test_mixture_dataset_reads_the_domain_cyclically(domain, general):
    plan = mixture_plan(300, 0.2, seed=0)
    ds = MixtureDataset(general[0], domain.train, plan, 32, TOK.eot_id, seed=0)
    dom = [ds[k] for k in np.flatnonzero(plan)]
    seen = torch.cat([d["labels"] for d in dom]).numpy()
    assert np.array_equal(seen, ds.domain_stream[1:len(seen) + 1])
    assert math.isclose(ds.domain_epochs, 60 * 32 / (domain.train.n_tokens + len(domain.train)))
    # each epoch of the stream holds every piece exactly once (with its EOT), in a fresh order
    epoch = ds.domain_stream[:ds.domain_stream_tokens]
    assert (epoch == TOK.eot_id).sum() == len(domain.train) and sorted(epoch[epoch != TOK.eot_id]) == sorted(domain.train.tokens)
    gen = [ds[k] for k in np.flatnonzero(~plan)]
    assert all((g["group_ids"] == 0).all() for g in gen) and all((d["group_ids"] == 1).all() for d in dom)
    starts = {tuple(g["input_ids"][:8].tolist()) + (len(g["input_ids"]),) for g in gen}
    assert len(ds.general_order[:len(gen)]) == len(set(ds.general_order[:len(gen)]))  # no general window repeats
    assert len(starts) > 1


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batch_sampler_shards_like_ddp(world):
    parts = [list(GlobalBatchSampler(5, 8, rank=r, world_size=world)) for r in range(world)]
    for s in range(5):
        flat = [i for p in parts for i in p[s]]
        assert sorted(flat) == list(range(s * 8, s * 8 + 8))
    with pytest.raises(ValueError, match="global_batch"): list(GlobalBatchSampler(2, 6, rank=0, world_size=4))


def _tiny_cfg(**kw):
    base = SPTConfig(TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32), seq_len=32, batch_size=8, steps=12,
                                 warmup_steps=2, val_every=6), max_general_eval_tokens=1024, checkpoint_fracs=(0.5, 1.0))
    return base.replace(**kw)


def _ft_cfg(**kw):
    "Finetuning on the tiny model's sequence length; `kw` mixes FinetuneConfig and TrainConfig fields."
    return FinetuneConfig(TrainConfig(batch_size=4, seq_len=32, schedule="constant", weight_decay=1e-7)).replace(**kw)


def test_configs_embed_the_shared_train_config():
    cfg = _tiny_cfg(seed=3, lr=1e-3, precision="bf16-mixed", impl="torch")
    assert isinstance(cfg.train, TrainConfig) and (cfg.train.seed, cfg.train.lr, cfg.train.precision, cfg.train.impl) == (3, 1e-3, "bf16-mixed", "torch")
    assert cfg.lit_kwargs()["max_steps"] == 120 and cfg.lit_kwargs()["lr"] == 1e-3 and cfg.tokens == 12 * 8 * 32
    assert cfg.replace(general="stdlib_tests").train == cfg.train
    with pytest.raises(ValueError, match="changes"): cfg.replace(lrs=(1e-3,))
    ft = _ft_cfg(lrs=(1e-3,), seed=2)
    assert ft.lrs == (1e-3,) and ft.train.seed == 2 and ft.train.schedule == "constant"
    with pytest.raises(ValueError, match="warmups"): _ft_cfg(warmups=(-1,))
    rc = spt_run_config(fast=True)
    assert rc.finetune.train.model == rc.pretrain.train.model and rc.finetune.train.seq_len == rc.pretrain.train.seq_len
    assert SPTConfig(train=dict(steps=9, warmup_steps=2)).train.steps == 9  # a recorded config (asdict) loads back
    with pytest.raises(TypeError, match="train"): SPTConfig(train=3)


def test_finetune_run_config(domain):
    cfg = _ft_cfg(max_epochs=3.0, evals_per_epoch=2.0)
    spe = cfg.steps_per_epoch(domain)
    t = cfg.run_config(domain, 2e-3, 3, ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32))
    assert (t.lr, t.warmup_steps, t.steps, t.val_every) == (2e-3, 3, math.ceil(3 * spe), max(1, round(spe / 2)))
    assert t.model.d_model == 32 and cfg.train.lr == TrainConfig().lr  # the grid point is a copy


def test_run_config_follows_the_contract():
    check_run_config(SPTRunConfig)
    rc = SPTRunConfig.fast(5)
    assert (rc.run_seed, rc.pretrain.train.seed, rc.finetune.train.seed) == (5, 5, 5)  # one seed, both stages
    assert SPTRunConfig.fast().with_seed(5) == rc and SPTRunConfig.preset(True, 5) == rc
    assert spt_run_config() == SPTRunConfig.full() and spt_run_config(fast=True) == SPTRunConfig.fast()
    full = SPTRunConfig.full()
    assert pair_pretrain(full, 3) == SPTRunConfig.full(3).pretrain.replace(val_every=full.pretrain.train.steps)
    assert pair_pretrain(full, 3, curves=True) == full.with_seed(3).pretrain
    with pytest.raises(ValueError, match="seed"): rc.with_seed(2**32)


def test_arms_are_registered_with_their_roles():
    arms = arms_of("spt")
    assert arm_specs("spt") == SPT_ARMS and list(arms) == list(SPT_ARMS)
    assert {k for k, a in arms.items() if a.role != "exploratory"} == {SPT_MAIN, SPT_REF}
    assert (arms[SPT_MAIN].role, arms[SPT_REF].role) == ("method", "baseline")
    for c in SPT_CLAIMS:  # every claim compares registered, non-exploratory arms on the domains
        for a in c.arms:
            dom, arm = a.split("/")
            assert dom in SPT_DOMAINS and arms[arm].role != "exploratory", (c.name, a)
    from trainlab.reproduce import available_reproductions
    reps = available_reproductions()
    assert all(reps[n].run_config is SPTRunConfig for n in ("spt", "spt_pilot", "spt_sweep"))


def test_arm_registry_and_claims_are_consistent():
    assert SPT_ARMS[SPT_MAIN].delta == 0.02 and SPT_ARMS[SPT_REF].delta == 0.0
    assert all(SPT_ARMS[k].on_curve == (SPT_ARMS[k].domain_start == 0) for k in SPT_ARMS)
    assert all(isinstance(c, Claim) for c in SPT_CLAIMS) and len(SPT_CLAIMS) == 2
    arms = {a for c in SPT_CLAIMS for a in c.arms}
    assert arms == {f"far/{a}" for a in (SPT_MAIN, SPT_REF)}  # the near domain is exploratory
    assert {(c.metric, c.direction) for c in SPT_CLAIMS} == {("post_ft_domain_report_bpb", "<"), ("forgetting_matched", "<")}
    for fast in (False, True):
        rc = spt_run_config(fast)
        assert {SPT_MAIN, SPT_REF} <= set(rc.arms) <= set(SPT_ARMS)
    with pytest.raises(ValueError, match="arms"): SPTRunConfig(arms=("0", "0.02", "0.5"))
    with pytest.raises(ValueError, match="pre-registered"): SPTRunConfig(arms=("0", "0.05"))
    with pytest.raises(ValueError, match="domains"): SPTRunConfig(domains=(("near", "stdlib_tests"), ("far", "unicode_names")))


def test_group_metrics_match_a_direct_computation(domain, general):
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    r = pretrain(domain, 0.25, cfg, general_corpus=general)
    dm, model = r["datamodule"], r["model"]
    assert sorted(r["snapshots"]) == [6, 12] and r["mixture"]["realised_delta"] == 0.25
    last = r["val"][-1]
    sets = dict(general=dm.general_eval,
                domain_train=domain.train, domain_test=domain.test)
    direct = evaluate_groups(model, sets, window=32)
    for k, v in direct.items(): assert math.isclose(last[f"val/{k}_bpb"], v, rel_tol=1e-5), k
    # and the grouped evaluator equals the per-token cross entropy of one short document, summed by hand
    m = TinyLM(cfg.train.model); m.load_state_dict(r["snapshots"][12])
    doc = TokenizedCorpus.from_documents([Document("d", "0041 LATIN CAPITAL LETTER A\n")], TOK)
    y = torch.tensor(doc.doc(0), dtype=torch.long)[None]
    x = torch.cat([torch.tensor([[TOK.eot_id]]), y[:, :-1]], 1)
    nats = torch.nn.functional.cross_entropy(m(x).logits[0].double(), y[0], reduction="sum").item()
    assert math.isclose(evaluate_groups(m, {"one": doc}, window=32)["one"], nats / math.log(2) / y.numel(), rel_tol=1e-5)


def test_train_metrics_are_logged_per_source(domain, general):
    r = pretrain(domain, 0.5, _tiny_cfg(steps=4, val_every=4), general_corpus=general)
    row = r["train"][-1]
    assert math.isfinite(row["train/general_bpb"]) and math.isfinite(row["train/domain_bpb"])


def test_snapshots_save_atomically(tmp_path, domain, general):
    snaps = Snapshots([2, 4], dirpath=tmp_path)
    pretrain(domain, 0.2, _tiny_cfg(steps=4, val_every=4), general_corpus=general, callbacks=[snaps])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000002.pt", "step0000004.pt"]
    state = torch.load(tmp_path / "step0000004.pt")
    assert all(torch.equal(state[k], v) for k, v in snaps.states[4].items())


class _Crash(L.Callback):
    "Raises after optimizer step `at`, as a killed run would stop."
    def __init__(self, at): self.at = at
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at: raise RuntimeError("simulated crash")


def test_pretrain_resumes_exactly_with_its_snapshots(tmp_path, domain, general):
    cfg = _tiny_cfg(steps=8, val_every=2, checkpoint_fracs=(0.25, 1.0))
    ref = pretrain(domain, 0.25, cfg, general_corpus=general)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(domain, 0.25, cfg, general_corpus=general, run_dir=tmp_path, callbacks=[_Crash(5)])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "snapshots" / "step0000002.pt").is_file()
    r = pretrain(domain, 0.25, cfg, general_corpus=general, run_dir=tmp_path)
    assert sorted(r["snapshots"]) == [2, 8] and sorted(r["snapshot_paths"]) == [2, 8]  # step 2 read back from disk after the restart
    for s in (2, 8):
        assert all(torch.equal(r["snapshots"][s][k], v) for k, v in ref["snapshots"][s].items()), s
    assert [v["step"] for v in r["val"]] == [2, 4, 6, 8] and r["val"][-1]["val/bpb"] == ref["val"][-1]["val/bpb"]
    assert not (tmp_path / "checkpoints").exists()


def test_finetune_resumes_with_its_best_point(tmp_path, domain, general):
    r = pretrain(domain, 0.0, _tiny_cfg(), general_corpus=general)
    cfg = _ft_cfg(max_epochs=4, evals_per_epoch=2, patience=100)
    ref = finetune(r["snapshots"][12], _tiny_cfg().train.model, domain, 1e-2, 1, cfg)
    at = ref["steps_run"] - 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(r["snapshots"][12], _tiny_cfg().train.model, domain, 1e-2, 1, cfg, run_dir=tmp_path, callbacks=[_Crash(at)])
    out = finetune(r["snapshots"][12], _tiny_cfg().train.model, domain, 1e-2, 1, cfg, run_dir=tmp_path)
    assert (out["best_step"], out["domain_test_bpb"], out["steps_run"]) == (ref["best_step"], ref["domain_test_bpb"], ref["steps_run"])
    assert all(torch.equal(out["state"][k], v) for k, v in ref["state"].items())


def test_finetune_keeps_the_start_when_nothing_beats_it(domain, general):
    r = pretrain(domain, 0.0, _tiny_cfg(), general_corpus=general)
    cfg = _ft_cfg(lrs=(50.0,), warmups=(0,), max_epochs=2, patience=1, grad_clip=1e6)
    out = finetune_grid(r["snapshots"][12], _tiny_cfg().train.model, domain, general[1], cfg)
    assert out["post_ft"]["best_step"] == 0 and out["post_ft"]["domain_test_bpb"] == out["pre_ft"]["domain_test_bpb"]
    assert out["forgetting"] == 0.0
    good = finetune_grid(r["snapshots"][12], _tiny_cfg().train.model, domain, general[1],
                         _ft_cfg(lrs=(3e-3, 1e-2), warmups=(1, 3), max_epochs=4, patience=2))
    assert len(good["grid"]) == 4
    assert good["post_ft"]["domain_test_bpb"] == pytest.approx(min(g["domain_test_bpb"] for g in good["grid"]), rel=1e-5)
    assert good["post_ft"]["domain_test_bpb"] < good["pre_ft"]["domain_test_bpb"]
    assert math.isclose(good["forgetting"], good["post_ft"]["general_bpb"] - good["pre_ft"]["general_bpb"])


def test_early_stopping_stops(domain, general):
    r = pretrain(domain, 0.0, _tiny_cfg(), general_corpus=general)
    cfg = _ft_cfg(lrs=(3e-2,), warmups=(0,), max_epochs=40, evals_per_epoch=1, patience=2)
    out = finetune(r["snapshots"][12], _tiny_cfg().train.model, domain, 3e-2, 0, cfg)
    assert out["steps_run"] < math.ceil(40 * out["steps_per_epoch"])  # stopped early, the domain is tiny and overfits
    assert out["best_step"] <= out["steps_run"]


TRUE = dict(A_train=0.5, b_train_s=-6.0, b_train_g=-0.3, kappa0=1.0, kappa1=0.15, kappa2=0.01, kappa3=2.0,
            alpha1=10.0, alpha2=1.0, alpha3=-3.0, b_gap_s=8.0, b_gap_g=-0.3, g0=0.2, g1=0.0, g2=-0.5)


def _synthetic(seed=0, noise=0.003):
    rng = np.random.default_rng(seed)
    T = np.linspace(0.1e6, 2.0e6, 24)
    return {d: [(t, law_train(t / 1e6, d, TRUE) + rng.normal(0, noise), law_test(t / 1e6, d, TRUE) + rng.normal(0, noise)) for t in T]
            for d in (0.0, 0.001, 0.01, 0.02, 0.05, 0.1)}


def test_overfitting_law_recovers_a_known_law_and_forecasts_the_turn():
    c = _synthetic()
    fit = fit_overfitting_law({d: v for d, v in c.items() if d <= 0.05})
    true_turn = predicted_turn(TRUE, 0.1, 1e5, 4e6)
    assert true_turn is not None and 0.5e6 < true_turn < 2e6
    pred = predicted_turn(fit["params"], 0.1, 1e5, 4e6)
    assert abs(pred - true_turn) / true_turn < 0.25
    obs = observed_turn([p[0] for p in c[0.1]], [p[2] for p in c[0.1]])
    assert abs(obs - true_turn) / true_turn < 0.25
    assert 0 < b_gap(0.1, fit["params"]) < 1 and fit["rmse_test"] < 0.01
    assert predicted_turn(fit["params"], 0.001, 1e5, 4e6) is None  # a small delta keeps improving


def test_observed_turn_and_interp():
    t = np.arange(10) * 1e5
    assert observed_turn(t, [5, 4, 3, 2, 1.5, 1.4, 1.3, 1.25, 1.2, 1.1]) is None
    assert observed_turn(t, [5, 4, 3, 2, 1.5, 1.6, 1.8, 2.0, 2.2, 2.4], smooth=1) == 4e5
    assert observed_turn(t, [5, 4, 3, 2, 1.5, 1.505, 1.5, 1.505, 1.5, 1.505], smooth=1, min_rise=0.01) is None
    with pytest.raises(ValueError, match="test_loss"): observed_turn([1, 2], [1, 2])
    assert interp_log_tokens([1e5, 1e6], [3.0, 2.0], 2.5) == pytest.approx(math.sqrt(1e5 * 1e6))
    assert interp_log_tokens([1e5, 1e6], [3.0, 2.0], 3.5) == 1e5 and interp_log_tokens([1e5, 1e6], [3.0, 2.0], 1.0) is None


def test_data_constrained_law_cannot_rise():
    D = effective_data([1e3, 1e4, 1e5, 1e6], 0.1, unique=3000)
    assert np.all(np.diff(D) > 0) and D[0] == 100  # below one epoch, every token is unique
    assert effective_data(1e9, 0.1, 3000) <= 3000 * (1 + 15.39) and effective_data(1e6, 0.1, 3000) < 3000 * (1 + 15.39)  # bounded by U (1 + R*)
    fit = fit_muennighoff({d: v for d, v in _synthetic().items() if d <= 0.05}, unique=3000)
    y = muennighoff_test(np.geomspace(1e4, 1e9, 300), 0.1, fit["params"])
    assert np.all(np.diff(y) <= 1e-12)


def test_domain_summary_metrics():
    def arm(post, pre_g=3.0, post_g=3.1, budgets=(1e6, 2e6, 3e6)):
        return {"budgets": {b: {"post_ft": {"domain_report_bpb": v}} for b, v in zip(budgets, post)}, "forgetting": post_g - pre_g}
    arms = {"0": arm([3.0, 2.8, 2.6]), "0.02": arm([2.9, 2.6, 2.5], post_g=3.05), "0.1": arm([2.5, 2.65, 2.7])}
    s = domain_summary(arms, [1e6, 2e6, 3e6], seeds_post={"0": [2.6, 2.62], "0.02": [2.5, 2.51]})
    assert s["best_delta"] == 0.02 and s["r_gain"] == pytest.approx(100 * 0.1 / 2.6) and s["metric"] == "domain_report_bpb"
    assert s["best_delta_by_budget"] == {"1000000.0": 0.1, "2000000.0": 0.02, "3000000.0": 0.02}
    # along delta = 2%'s own curve (2.9, 2.6, 2.5): it reaches NPT's final 2.6 at 2M tokens, 1.5x fewer; the envelope would say 3x (10% at 1M)
    assert s["compute_multiplier"] == pytest.approx(1.5) and s["compute_multiplier_delta"] == 0.02 and not s["compute_multiplier_is_lower_bound"]
    assert s["forgetting"]["0.02"] == pytest.approx(0.05)
    assert s["r_gain_by_seed"] == pytest.approx([100 * 0.1 / 2.6, 100 * 0.11 / 2.62])
    # a domain run at the final budget only has no curve to follow
    near = {"0": arm([2.6], budgets=(3e6,)), "0.02": arm([2.5], budgets=(3e6,))}
    assert domain_summary(near, [1e6, 2e6, 3e6])["compute_multiplier"] is None


class _RanksAgree(L.Callback):
    "Fails the run unless the ranks train on disjoint slices of one global batch and agree on every per-source metric."
    def __init__(self, global_batch): self.global_batch = global_batch
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        idx = trainer.strategy.all_gather(batch["index"])
        s = trainer.global_step - 1
        assert sorted(idx.flatten().tolist()) == list(range(s * self.global_batch, (s + 1) * self.global_batch)), "not the global batch"
        m = torch.tensor([float(trainer.callback_metrics.get(k, -1.0)) for k in ("train/general_bpb", "train/domain_bpb")])
        g = trainer.strategy.all_gather(m)
        assert torch.equal(g[0], g[1]), f"ranks disagree on per-source metrics: {g.tolist()}"
        pl_module.log("train/world", float(trainer.world_size))

    def on_validation_end(self, trainer, pl_module):
        m = torch.tensor([float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")])
        g = trainer.strategy.all_gather(m)
        assert torch.equal(g[0], g[1]), "ranks disagree on validation"


def test_ddp_two_processes_pretrain_and_finetune(domain, general, tmp_path):
    cfg = _tiny_cfg(steps=6, val_every=3, warmup_steps=1)  # the cosine over 10x the run: 60 steps
    assert cfg.lit_kwargs()["max_steps"] == 60 and cfg.checkpoint_steps() == [3, 6]
    single = MixtureDataModule(domain, general=general, delta=0.25, num_steps=6, batch_size=8, seq_len=32, max_general_eval_tokens=1024)
    r = pretrain(domain, 0.25, cfg, general_corpus=general, snapshot_dir=tmp_path, callbacks=[_RanksAgree(8)], accelerator="cpu", devices=2,
                 strategy="ddp_spawn")
    lit_model, metrics = r["model"], r["metrics"]
    assert metrics["train/world"] == 2
    # rank 0 wrote the snapshots; the last one holds the trained weights ddp_spawn hands back to this process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000003.pt", "step0000006.pt"]
    assert sorted(r["snapshot_paths"]) == [3, 6]
    last = torch.load(tmp_path / "step0000006.pt")
    assert all(torch.equal(last[k], v) for k, v in lit_model.state_dict().items())
    # the validation sums over ranks equal one process evaluating everything with the trained weights
    single.setup()
    sets = dict(general=single.general_eval,
                domain_train=domain.train, domain_test=domain.test)
    direct = evaluate_groups(lit_model, sets, window=32)
    for k, v in direct.items(): assert math.isclose(metrics[f"val/{k}_bpb"], v, rel_tol=1e-4), k
    # finetuning under DDP: domain-only global batches, ranks agree, early stopping and KeepBest see the same metric
    fcfg = _ft_cfg(lrs=(1e-2,), warmups=(1,), max_epochs=2, patience=2)
    out = finetune(lit_model.state_dict(), cfg.train.model, domain, 1e-2, 1, fcfg, callbacks=[_RanksAgree(4)], accelerator="cpu", devices=2,
                   strategy="ddp_spawn")
    assert out["metrics"]["train/world"] == 2 and math.isfinite(out["metrics"]["val/domain_test_bpb"])
    assert "val/general_bpb" not in out["metrics"]  # finetuning validates on the two small domain sets only


def _committed(name):
    from pathlib import Path
    from trainlab.core import read_json
    return read_json(Path(__file__).parents[1] / f"nbs/results/{name}/metrics.json")


def test_main_run_follows_the_committed_pilot():
    "The pilot measured today's design, and the main run's seed count is its pick (fixed before the main run)."
    from dataclasses import asdict
    from trainlab.spt import SPT_SEEDS, SPT_EXPECTED_EFFECT, pick_seeds, seeds_needed
    from trainlab.stats import std
    p = _committed("spt_pilot")
    import json
    rc = json.loads(json.dumps(asdict(spt_run_config().with_seed(p["seeds"][0]["seed"]))))  # as JSON has it
    assert {k: p["config"][k] for k in rc} == rc  # the pilot ran the current run config
    assert p["seeds_needed"] == seeds_needed(std(p["r_gain"]), SPT_EXPECTED_EFFECT)
    assert p == p | pick_seeds(p["r_gain"], p["pretrain_s_mean"], p["finetune_s_mean"], spt_run_config())  # the pick follows the rule in code
    assert SPT_SEEDS == p["seeds_picked"]
    from trainlab.spt import SPT_PILOT_SEEDS
    assert set(p["config"]["seeds"] if "seeds" in p["config"] else [r["seed"] for r in p["seeds"]]) <= set(SPT_PILOT_SEEDS)


def _same_record(got, want, rel=1e-9) -> bool:
    "`got` equals `want`, floats to `rel` and everything else exactly, through nested dicts and lists."
    if isinstance(want, dict):
        return (isinstance(got, dict) and got.keys() == want.keys()
                and all(_same_record(got[k], want[k], rel) for k in want))
    if isinstance(want, (list, tuple)):
        return (isinstance(got, (list, tuple)) and len(got) == len(want)
                and all(_same_record(g, w, rel) for g, w in zip(got, want)))
    if isinstance(want, float) and not isinstance(got, bool):
        return isinstance(got, (int, float)) and got == pytest.approx(want, rel=rel, nan_ok=True)
    return got == want


def test_same_record():
    rec = {"name": "c", "arms": ["far/0.02", "far/0"], "estimate": 0.1, "ci95": [0.05, 0.15], "n_seeds": 6}
    assert _same_record(rec, dict(rec, estimate=0.1 + 1e-12, arms=("far/0.02", "far/0")))
    assert not _same_record(rec, dict(rec, estimate=0.11))
    assert not _same_record(rec, dict(rec, arms=["far/0", "far/0.02"]))
    assert not _same_record(rec, dict(rec, ci95=[0.05, 0.16]))
    assert not _same_record(rec, dict(rec, verdict="holds"))


def test_committed_claims_recompute_from_their_samples():
    "Every committed claim of the main run is what its per-seed samples give; R_gain is the paired relative gain of those samples."
    m = _committed("spt")
    if "samples" not in m: pytest.skip("the main run (trainlab reproduce spt) is not committed yet")
    assert [c["name"] for c in m["claims"]] == [c.name for c in SPT_CLAIMS]
    for c, rec in zip(SPT_CLAIMS, m["claims"]):  # floats to 1e-9, the rest (names, arms, verdict) exactly
        assert _same_record(rec, c.judge(m["samples"])), c.name
    for d in m["domains"]:
        b0, b2 = (m["samples"][f"{d}/{a}"]["post_ft_domain_report_bpb"] for a in (SPT_REF, SPT_MAIN))
        assert m["samples"][f"{d}/{SPT_MAIN}"]["r_gain"] == pytest.approx([100 * (x - y) / x for x, y in zip(b0, b2)])
        assert [r["seed"] for r in m["domains"][d]["seeds"][SPT_MAIN]] == [r["seed"] for r in m["domains"][d]["seeds"][SPT_REF]]  # paired


def test_committed_matched_forgetting_recomputes_from_the_curves():
    "Each seed's matched point and forgetting come from its two trade-off curves, by the rule fixed in `matched_forgetting`."
    from trainlab.spt import matched_forgetting
    m = _committed("spt")
    if "samples" not in m or "tradeoff" not in m["domains"]["far"]["seeds"][SPT_REF][0]:
        pytest.skip("the main run with trade-off curves (trainlab reproduce spt) is not committed yet")
    for d, dd in m["domains"].items():
        for r0, r1 in zip(dd["seeds"][SPT_REF], dd["seeds"][SPT_MAIN]):
            mf = matched_forgetting(r0["tradeoff"], r1["tradeoff"])
            assert r0["matched_domain_test_bpb"] == r1["matched_domain_test_bpb"] == mf["target_domain_test_bpb"]
            assert (r0["forgetting_matched"], r1["forgetting_matched"]) == pytest.approx(
                (mf["ref"]["forgetting"], mf["main"]["forgetting"]), rel=1e-12)
        s = m["samples"]
        assert s[f"{d}/{SPT_REF}"]["forgetting_matched"] == [r["forgetting_matched"] for r in dd["seeds"][SPT_REF]]
    # fresh seeds: the confirmation never reuses the pilot's
    assert not set(_committed("spt")["config"].get("seeds", [])) & {r["seed"] for r in _committed("spt_pilot")["seeds"]}
    assert not {r["seed"] for r in m["domains"]["far"]["seeds"][SPT_REF]} & {r["seed"] for r in _committed("spt_pilot")["seeds"]}
