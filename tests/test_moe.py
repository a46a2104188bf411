"""trainlab.moe: the routed FFNs, their losses and schedules, routing statistics, and training under DDP."""
import math
from dataclasses import asdict

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from trainlab.data import LMDataModule
from trainlab.model import ModelConfig, TinyLM, count_parameters
from trainlab.moe import (
    CLAIM_ARMS, MOE_ARMS, MOE_CLAIMS, SAMPLE_KEYS, AdaptiveCoefficient, BlockFFN, ChunkLossScheduler, DenseFFN, ExpertCountSchedule,
    MoEConfig, MoELitModule, MoERunConfig, ReMoE, ReMoEController, ReMoESparsityCallback, SMoEDropout, THORFFN, THORLitModule, TopKMoE,
    chunk_hit_probability_bruteforce, chunk_sparsity_loss, collect_router_scores, evaluate_routing, locality_loss,
    make_arm, measure_inference, routing_stats, weighted_experts)
from trainlab.reproduce import REPRODUCTIONS
from trainlab.runconfig import arm_specs, arms_of, check_claim_arms, check_run_config
from trainlab.train import TrainConfig, fit

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64)


def tiny_train(**kw):
    "A TrainConfig for the tiny model on 2 x 32-token batches."
    return TrainConfig(**{**dict(model=TINY, steps=3, warmup_steps=1, batch_size=2, seq_len=32), **kw})


def tiny_data(cfg, max_eval_tokens=512):
    return LMDataModule(corpus="stdlib_prose", seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_eval_tokens=max_eval_tokens, seed=cfg.seed)


# ---------------------------------------------------------------- routing statistics

def brute_cls(act, docs, s):
    "CLS@s by explicit loops over rows, documents and chunks."
    hits = total = 0
    for r in range(act.shape[0]):
        t = 0
        while t < act.shape[1]:
            if docs[r, t] < 0: t += 1; continue
            end = t
            while end < act.shape[1] and docs[r, end] == docs[r, t]: end += 1
            for c in range(t, end - s + 1, s):
                hits += int(act[r, c:c + s].any(0).sum()); total += act.shape[2]
            t = end
    return None if total == 0 else 1 - hits / total


@pytest.mark.parametrize("seed", range(6))
def test_routing_stats_matches_loops_on_random_masks(seed):
    g = torch.Generator().manual_seed(seed)
    B, Lq, E = 3, 37, 5
    scores = torch.rand(B, Lq, E, generator=g) * (torch.rand(B, Lq, E, generator=g) < 0.3)
    docs = torch.cumsum(torch.rand(B, Lq, generator=g) < 0.1, 1)
    docs[0, -4:] = -1  # padding at the end of a row
    st = routing_stats(scores, docs, chunk_sizes=(1, 2, 3, 8, 16))
    act = scores != 0
    valid = docs >= 0
    assert st["tokens"] == int(valid.sum())
    assert st["tls"] == pytest.approx(1 - act[valid].float().mean().item())
    for s in (1, 2, 3, 8, 16):
        expect = brute_cls(act, docs, s)
        assert (st["cls"][str(s)] is None) == (expect is None)
        if expect is not None: assert st["cls"][str(s)] == pytest.approx(expect)
    assert st["cls"]["1"] == pytest.approx(st["tls"])  # 1-token chunks are tokens
    load = act[valid].float().mean(0)
    assert st["load"] == pytest.approx(load.tolist())
    assert st["dead_experts"] == int((load == 0).sum())
    assert st["zero_expert_tokens"] == pytest.approx((act[valid].sum(1) == 0).float().mean().item())


def test_routing_stats_2d_equals_single_row_and_never_chunks_across_rows():
    a = torch.zeros(8, 4); a[::2, 0] = 1; a[1::2, 1] = 1
    assert routing_stats(a)["cls"]["2"] == pytest.approx(0.5)
    assert routing_stats(a) == routing_stats(a[None])
    # two rows of 3 tokens, expert 1 active only on each row's last token: with 2-token chunks each row holds one whole
    # chunk [0, 1] (nothing active) and a dropped tail; chunking across rows would join row 0's tail with row 1's start
    b = torch.zeros(2, 3, 2); b[:, 2, 1] = 1
    assert routing_stats(b, chunk_sizes=(2,))["cls"]["2"] == 1.0
    assert routing_stats(b.reshape(1, 6, 2), chunk_sizes=(2,))["cls"]["2"] == pytest.approx(1 - 2 / 6)  # chunks [2,3] and [4,5] hit expert 1


def test_routing_stats_token_dependence_and_bad_input():
    fixed = torch.zeros(50, 6); fixed[:, 1] = 1
    st = routing_stats(fixed)
    assert (st["token_dependence"], st["always_on"], st["dead_experts"]) == (0.0, 1, 5)
    alternating = torch.zeros(50, 6); alternating[::2, 0] = 1; alternating[1::2, 3] = 1
    assert 0.4 < routing_stats(alternating)["token_dependence"] < 0.6  # half the random pairs disagree completely
    assert routing_stats(torch.zeros(3, 4), torch.full((3,), -1))["tls"] is None  # all padding
    with pytest.raises(ValueError, match="scores"): routing_stats(torch.zeros(4))
    with pytest.raises(ValueError, match="doc_ids"): routing_stats(torch.zeros(4, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="chunk_sizes"): routing_stats(torch.zeros(4, 3), chunk_sizes=(0,))


# ---------------------------------------------------------------- BlockFFN losses

@pytest.mark.parametrize("s,Lq", [(1, 5), (3, 9), (4, 10), (2, 7)])
def test_chunk_loss_closed_form_equals_bruteforce(s, Lq):
    g = torch.Generator().manual_seed(s * 10 + Lq)
    p = torch.rand(2, Lq, 4, generator=g, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True) * 0.9
    chunks = []
    for b in range(2):
        for c in range(0, Lq, s): chunks.append(chunk_hit_probability_bruteforce(p[b, c:c + s]))
    assert float(chunk_sparsity_loss(p, s)) == pytest.approx(float(torch.stack(chunks).mean()), abs=1e-4)


def test_locality_loss_masks_document_boundaries_and_is_not_detached():
    s = torch.randn(1, 6, 3, requires_grad=True)
    same = torch.zeros(1, 6, dtype=torch.long)
    full = locality_loss(s, same)
    pairs = F.binary_cross_entropy_with_logits(100 * s[:, :-1], torch.sigmoid(100 * s[:, 1:]), reduction="none").mean(-1)
    assert float(full.detach()) == pytest.approx(float(pairs.detach().mean()), rel=1e-6)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])  # the pair (2, 3) crosses a boundary
    assert locality_loss(s, docs).item() == pytest.approx(pairs[0, [0, 1, 3, 4]].mean().item(), rel=1e-6)
    assert locality_loss(s, torch.arange(6)[None]).item() == 0.0  # every token its own document: no pairs
    full.backward()
    assert s.grad[0, -1].abs().sum() > 0  # the target side (t) receives gradient as well


def test_blockffn_router_output_and_losses():
    torch.manual_seed(0)
    f = BlockFFN(16, 8, 4, chunk=4, chunk_coef=0.3)
    x = torch.randn(2, 8, 16)
    s_raw, n, r = f.route(x.reshape(-1, 16))
    assert torch.equal(r > 0, s_raw > 0)
    ms = s_raw.relu().pow(2).mean(-1)  # RMSNorm: mean n^2 = ms / (ms + eps), i.e. RMS 1 up to eps (1e-5, official) where any is active
    assert torch.allclose(n.pow(2).mean(-1), ms / (ms + f.eps), atol=1e-6)
    y, aux = f(x, doc_ids=torch.zeros(2, 8, dtype=torch.long))
    assert torch.allclose(y, weighted_experts(x.reshape(-1, 16), f.w_in, f.w_out, r).view_as(x), atol=1e-6)
    assert set(aux["losses"]) == {"locality", "chunk"}
    p = n / (n.sum(-1, keepdim=True) + 1e-5)
    assert float(aux["losses"]["chunk"]) == pytest.approx(0.3 * float(chunk_sparsity_loss(p.view(2, 8, 8), 4)), rel=1e-5)
    f.eval()
    assert f(x)[1]["losses"] == {}
    assert BlockFFN(16, 8, 4, locality_coef=0, chunk_coef=0).train()(x)[1]["losses"] == {}
    with pytest.raises(ValueError, match="chunk_coef"): BlockFFN(16, 8, 4, chunk_coef=-1)
    with pytest.raises(ValueError, match="x"): f(torch.randn(3, 15))


# ---------------------------------------------------------------- TopK / ReMoE / SMoE / THOR

def test_topk_routing_gates_balance_and_shared_experts():
    torch.manual_seed(0)
    f = TopKMoE(16, 6, 4, k=2, balance_coef=0.5)
    x = torch.randn(20, 16)
    y, aux = f(x)
    sc = aux["scores"]
    assert ((sc != 0).sum(1) == 2).all() and torch.allclose(sc.sum(1), torch.ones(20))
    probs = f.router(x).softmax(-1)
    assert torch.equal((sc != 0), torch.zeros_like(sc, dtype=torch.bool).scatter(1, probs.topk(2).indices, True))
    frac = (sc != 0).float().sum(0) / 40
    assert float(aux["losses"]["balance"]) == pytest.approx(float(0.5 * 6 * (frac * probs.mean(0)).sum()), rel=1e-5)
    assert torch.allclose(y, weighted_experts(x, f.w_in, f.w_out, sc), atol=1e-6)
    sh = TopKMoE(16, 5, 4, k=1, n_shared=1)
    y2, aux2 = sh(x)
    assert aux2["scores"].shape == (20, 6) and (aux2["scores"][:, -1] == 1).all()
    assert torch.allclose(y2, weighted_experts(x, sh.w_in, sh.w_out, aux2["scores"][:, :5]) + sh.shared(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="k"): TopKMoE(16, 4, 4, k=5)


def test_remoe_penalty_and_controller_callback():
    torch.manual_seed(0)
    f = ReMoE(16, 8, 4, k=2, lambda0=0.1)
    x = torch.randn(30, 16)
    y, aux = f(x)
    R = F.relu(f.router(x))
    expect = 0.1 * 8 * (R.mean(0) * (R > 0).float().sum(0) / (30 * 2)).sum()
    assert float(aux["losses"]["remoe_l1"]) == pytest.approx(float(expect), rel=1e-5)
    assert float(f.last_sparsity) == pytest.approx(float(1 - (R > 0).float().mean()))
    assert f.target_sparsity == 0.75
    # the callback moves lambda up while sparsity is below the target, for every layer alike
    cfg = tiny_train()
    lit, _, _ = fit(cfg, lambda: MoELitModule(TinyLM(TINY, ffn=lambda c, i: ReMoE(c.d_model, 8, 4, k=2, lambda0=1e-3)), **cfg.lit_kwargs()),
                    tiny_data(cfg), callbacks=[ReMoESparsityCallback(0.999, 1e-3, 2.0)], accelerator="cpu")
    assert [float(m.l1_coef) for m in lit.model.modules() if isinstance(m, ReMoE)] == pytest.approx([8e-3, 8e-3])


def test_smoe_dropout_frozen_router_k_and_schedule():
    m = SMoEDropout(16, 8, 4, k=2)
    w0 = m.router_weight.clone()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
    m(torch.randn(5, 16))[0].sum().backward(); opt.step()
    assert torch.equal(w0, m.router_weight)
    m.k = 8
    sc = m(torch.randn(5, 16))[1]["scores"]
    assert ((sc != 0).sum(1) == 8).all() and torch.allclose(sc.sum(1), torch.ones(5))
    with pytest.raises(ValueError, match="k"): m.k = 9
    sch = ExpertCountSchedule(8, 16, 400)
    assert [sch.k_at(t) for t in (0, 25, 200, 399, 400, 500)] == [8, 9, 12, 16, 16, 16]


def test_thor_one_expert_per_batch_in_training_per_sequence_in_eval():
    torch.manual_seed(0)
    f = THORFFN(8, 2, 4)
    x = torch.randn(6, 5, 8)
    sc = f(x)[1]["scores"]
    assert (sc == sc[0, 0]).all()  # one expert for the whole batch
    f.eval()
    torch.manual_seed(3)
    sc = f(x)[1]["scores"]
    assert all((sc[b] == sc[b, 0]).all() for b in range(6)) and len({int(sc[b, 0].argmax()) for b in range(6)}) == 2
    y, _ = f(x[0])  # 2-D input: one sequence
    assert y.shape == (5, 8)


def test_thor_consistency_term():
    torch.manual_seed(0)
    model = TinyLM(TINY, ffn=lambda cfg, i: THORFFN(cfg.d_model, 2, 16))
    lit = THORLitModule(model, consistency=5.0, max_steps=1)
    batch = {"input_ids": torch.randint(0, 256, (2, 16)), "labels": torch.randint(0, 256, (2, 16))}
    lit.train()
    out = lit._run(batch)
    assert float(out.aux_losses["consistency"]) >= 0
    same = TinyLM(TINY, ffn=lambda cfg, i: THORFFN(cfg.d_model, 2, 16))
    for m in same.modules():  # identical experts: both passes agree exactly, so the consistency term is 0
        if isinstance(m, THORFFN):
            with torch.no_grad(): m.w_in[1].copy_(m.w_in[0]); m.w_out[1].copy_(m.w_out[0])
    lit2 = THORLitModule(same, consistency=5.0, max_steps=1); lit2.train()
    assert float(lit2._run(batch).aux_losses["consistency"]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- schedules

def test_adaptive_coefficient_ramps_linearly_and_respects_hold():
    sch = AdaptiveCoefficient(1.0, hold=2, window=2)
    vals = [sch.step(v) for v in (1, 1, 2, 2, 2, 2)]
    # windows: [1,1] -> mean 1 (t=2, still holding); [2,2] -> ratio 2 -> target 2, ramped over the next 2 steps
    assert vals == pytest.approx([1, 1, 1, 1, 1.5, 2.0])
    with pytest.raises(ValueError, match="window"): AdaptiveCoefficient(1.0, window=0)
    with pytest.raises(ValueError, match="c0"): AdaptiveCoefficient(0.0)


def test_remoe_controller_clamp_variants():
    a, b = ReMoEController(0.5, 1.0, 2.0), ReMoEController(0.5, 1.0, 2.0, clamp=True)
    assert [a.step(0.9) for _ in range(2)] == [0.5, 0.25]
    assert [b.step(0.9) for _ in range(2)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="target"): ReMoEController(1.0)


# ---------------------------------------------------------------- arms, measurement, DDP

@pytest.mark.parametrize("arm", list(MOE_ARMS))
def test_every_arm_builds_with_equal_total_ffn_width(arm):
    moe = MoEConfig(n_experts=8, d_expert=8, k=2)
    factory, cbs = make_arm(arm, tiny_train(steps=10), moe)
    lit = factory()
    ffn = lit.model.layers[0].mlp
    width = sum(p.numel() for n, p in ffn.named_parameters() if n.endswith(("w_in")) or n.endswith("shared.w_in")) // TINY.d_model
    assert width == 64
    assert isinstance(lit, THORLitModule) == (arm == "thor")
    counts = count_parameters(lit.model)
    assert counts["active"] <= counts["total"]
    assert lit.hparams.max_steps == 10  # the optimisation settings come from the TrainConfig


def test_make_arm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="arm"): make_arm("top_k", tiny_train(), MoEConfig())
    with pytest.raises(TypeError, match="train"): make_arm("topk", TINY, MoEConfig())
    with pytest.raises(TypeError, match="moe"): make_arm("topk", tiny_train(), {"k": 2})


def test_run_config_embeds_train_config_and_checks_arms():
    rc = MoERunConfig.full()
    assert isinstance(rc.train, TrainConfig) and (rc.train.steps, rc.train.impl, rc.train.precision) == (400, "auto", "32-true")
    assert rc.arms == tuple(MOE_ARMS) and rc.with_seed(3).train.seed == 3 and rc.train.seed == 0
    assert rc.with_seed(3) == MoERunConfig.full(3)
    assert MoERunConfig.preset(True, 2) == MoERunConfig.fast(2)
    check_run_config(MoERunConfig)  # the presets agree with with_seed: a seed changes nothing else
    assert {REPRODUCTIONS[n].run_config for n in ("moe", "moe_calibration")} == {MoERunConfig}
    fast = MoERunConfig.fast()
    assert MoERunConfig(**asdict(fast)) == fast  # the recorded config (a dict) builds the same run
    assert MoERunConfig(train=fast.train.replace(precision="bf16-mixed", impl="torch")).train.precision == "bf16-mixed"
    with pytest.raises(ValueError, match="arms"): MoERunConfig(arms=("topk", "top_k"))
    with pytest.raises(ValueError, match="inference_arms"): MoERunConfig(arms=("topk",))
    with pytest.raises(ValueError, match="exploratory_seeds"): MoERunConfig(exploratory_seeds=0)


def test_claims_are_registered_with_the_reproduction():
    rep = REPRODUCTIONS["moe"]
    assert rep.claims == MOE_CLAIMS and rep.default_seeds >= 3
    got = {c.name: (c.metric, c.arms, c.comparison, c.direction, c.threshold) for c in MOE_CLAIMS}
    assert got == {"blockffn_tls": ("tls", ("blockffn",), "mean", ">", 0.80),
                   "blockffn_cls8": ("cls8", ("blockffn",), "mean", ">", 0.60),
                   "blockffn_bpb_vs_topk": ("val_bpb", ("blockffn", "topk"), "ratio", "<", 1.02),
                   "blockffn_token_dependence": ("token_dependence", ("blockffn",), "mean", ">", 0.30),
                   "blockffn_degenerate_experts": ("degenerate_share", ("blockffn",), "mean", "<", 0.10),
                   "topk_cls8_below_blockffn": ("cls8", ("topk", "blockffn"), "diff", "<", 0.0),
                   "chunk_sparse_speedup_t8": ("speedup_t8", ("blockffn",), "mean", ">", 1.5),
                   "chunk_sparse_speedup_t8_d512": ("speedup_t8_scaled", ("blockffn",), "mean", ">", 4.0)}
    assert CLAIM_ARMS == ("blockffn", "topk") and {c.metric for c in MOE_CLAIMS} <= set(SAMPLE_KEYS)
    assert set(CLAIM_ARMS) <= set(MOE_ARMS)
    check_claim_arms("moe", MOE_CLAIMS)  # every claim arm registered and not exploratory


def test_arms_are_registered_with_roles():
    roles = {n: a.role for n, a in arms_of("moe").items()}
    assert list(roles) == list(MOE_ARMS) == [
        "dense", "topk", "topk_shared", "remoe", "blockffn", "blockffn_no_locality",
        "blockffn_no_chunk", "smoe_dropout", "thor"]
    assert roles == {
        "dense": "baseline", "topk": "baseline", "topk_shared": "exploratory", "remoe": "baseline",
        "blockffn": "method", "blockffn_no_locality": "ablation", "blockffn_no_chunk": "ablation",
        "smoe_dropout": "exploratory", "thor": "exploratory"}
    assert MOE_ARMS == arm_specs("moe") and all(a.description for a in arms_of("moe").values())


def test_moe_defaults_are_the_committed_calibration_pick():
    "MoEConfig's router-loss coefficients were fixed from the registered sweep before the main run: they must equal its pick."
    from pathlib import Path
    from trainlab.core import read_json
    from trainlab.moe import calibration_pick
    m = read_json(Path(__file__).parents[1] / "nbs/results/moe_calibration/metrics.json")
    assert m["selected"] == calibration_pick(m["settings"])  # the pick follows the rule registered in code
    cfg = MoEConfig()
    assert (cfg.locality_coef, cfg.locality_alpha, cfg.chunk_c0) == tuple(m["selected_point"][k] for k in ("locality_coef", "locality_alpha", "chunk_c0"))


class _Crash(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 7: raise RuntimeError("simulated crash")


@pytest.mark.parametrize("arm", ["blockffn", "remoe"])
def test_schedules_resume_exactly_from_the_checkpoint(arm, tmp_path):
    "Killed after a validation and resumed by `fit`: the steered coefficient and the losses follow the uninterrupted run."
    cfg = tiny_train(steps=10, val_every=5)
    moe = MoEConfig(n_experts=8, d_expert=8, k=2, chunk=8, chunk_hold=2, chunk_window=2, remoe_lambda0=1e-3)
    def run(**kw):
        lit, cbs = make_arm(arm, cfg, moe)
        return fit(cfg, lit, tiny_data(cfg), callbacks=[*cbs, *kw.pop("extra", [])], accelerator="cpu", **kw)
    _, ref, _ = run()
    with pytest.raises(RuntimeError, match="simulated crash"): run(extra=[_Crash()], run_dir=tmp_path)
    _, hist, _ = run(run_dir=tmp_path)
    key = "train/chunk_coef" if arm == "blockffn" else "train/remoe_lambda"
    assert [r[key] for r in hist.train] == pytest.approx([r[key] for r in ref.train], rel=1e-6)
    assert len({r[key] for r in ref.train}) > 1  # the coefficient did move during the run
    assert [r["train/loss"] for r in hist.train] == pytest.approx([r["train/loss"] for r in ref.train], abs=1e-5)
    assert hist.val[-1]["val/bpb"] == pytest.approx(ref.val[-1]["val/bpb"], abs=1e-6)


def test_collect_and_measure_on_a_tiny_blockffn():
    torch.manual_seed(0)
    model = TinyLM(TINY, ffn=lambda cfg, i: BlockFFN(cfg.d_model, 8, 8, chunk=4))
    dm = LMDataModule(corpus="stdlib_prose", seq_len=32, batch_size=2, max_eval_tokens=512)
    dm.setup()
    scores, docs, inputs = collect_router_scores(model, dm.val_dataloader(), max_batches=2)
    assert len(scores) == 2 and scores[0].shape[:2] == docs.shape and inputs[0].shape[-1] == 32
    ev = evaluate_routing(scores, docs, chunk_sizes=(2, 4))
    assert 0 <= ev["tls"] <= 1 and ev["cls"]["4"] <= ev["cls"]["2"] <= ev["tls"] + 1e-9
    res = measure_inference(model, scores, docs, inputs, chunk_lengths=(1, 4), chunks_per_layer=2, repeats=2)
    assert set(res) == {"1", "4"} and all(r["speedup"] > 0 and 0 < r["active_fraction"] <= 1 for r in res.values())
    dense = TinyLM(TINY, ffn=lambda cfg, i: DenseFFN(cfg.d_model, 64))
    assert collect_router_scores(dense, dm.val_dataloader(), max_batches=1) == (None, None, None)


class _SameOnAllRanks(L.Callback):
    "Fails the run if any routing coefficient differs between ranks (they must be set from rank-reduced inputs)."
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        vals = []
        for m in pl_module.model.modules():
            if isinstance(m, BlockFFN): vals.append(m.chunk_coef.float())
            if isinstance(m, ReMoE): vals.append(m.l1_coef.float())
            if isinstance(m, SMoEDropout): vals.append(torch.tensor(float(m.k)))
        if vals:
            v = torch.stack(vals)
            allv = trainer.strategy.all_gather(v)
            assert torch.equal(allv[0], allv[1]), f"coefficients differ across ranks: {allv}"


def _mixed(cfg, i):
    "One layer of each routed kind, so a single DDP run covers every component and its schedule."
    return [TopKMoE(cfg.d_model, 8, 8, k=2), TopKMoE(cfg.d_model, 7, 8, k=1, n_shared=1), ReMoE(cfg.d_model, 8, 8, k=2, lambda0=1e-4),
            BlockFFN(cfg.d_model, 8, 8, chunk=8), SMoEDropout(cfg.d_model, 8, 8, k=4), DenseFFN(cfg.d_model, 64)][i]


@pytest.mark.parametrize("kind", ["mixed", "thor"])
def test_ddp_two_processes_train_every_component(kind):
    cfg = ModelConfig(d_model=32, n_layers=6 if kind == "mixed" else 2, n_heads=2, max_seq_len=64)
    train = tiny_train(model=cfg, steps=4, val_every=4)
    torch.manual_seed(0)
    if kind == "mixed":
        lit = MoELitModule(TinyLM(cfg, ffn=_mixed), **train.lit_kwargs())
        cbs = [ChunkLossScheduler(0.1, hold=0, window=1), ReMoESparsityCallback(0.9, 1e-4, 1.5), ExpertCountSchedule(4, 8, 4)]
    else:
        lit = THORLitModule(TinyLM(cfg, ffn=lambda c, i: THORFFN(c.d_model, 2, 32)), **train.lit_kwargs())
        cbs = []
    before = [p.detach().clone() for p in lit.model.parameters()]
    _, _, trainer = fit(train, lit, tiny_data(train, max_eval_tokens=1024), callbacks=[*cbs, _SameOnAllRanks()],
                        accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert trainer.world_size == 2
    assert math.isfinite(float(trainer.callback_metrics["val/bpb"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, lit.model.parameters()))
    if kind == "mixed":
        assert float(trainer.callback_metrics["train/smoe_k"]) == 8  # the schedule reached k_max
        assert float(trainer.callback_metrics["train/remoe_lambda"]) != 1e-4  # lambda moved
        assert "train/aux/chunk" in trainer.callback_metrics and "train/aux/balance" in trainer.callback_metrics
    else:
        assert float(trainer.callback_metrics["train/aux/consistency"]) >= 0


def test_plots_stay_importable_from_experiment():
    import trainlab.moe.experiment as ex
    import trainlab.moe.plots as pl
    assert set(pl.__all__) <= set(ex.__all__)
    assert all(getattr(ex, n) is getattr(pl, n) for n in pl.__all__)
