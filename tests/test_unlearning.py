import math

import lightning as L
import numpy as np
import pytest
import torch

from trainlab.data import ByteTokenizer
from trainlab.kernels import generic_labels_ref, kl_div_ref
from trainlab.model import ModelConfig, TinyLM
from trainlab.train import TrainConfig
from trainlab.unlearning import (
    FORM_RENDERERS, FORMS, HELD_OUT_FORMS, NARRATIVE, PARAPHRASES, RELATIONS, TRAINED_FORMS, UNIVERSES, UNLEARN_ARMS, UNLEARN_CLAIMS,
    UNLEARN_METHODS, WORLD_MODELS, ForgetRetainDataModule, GenericLogitsLM, SeedRun, UnlearnLitModule, UnlearnRunConfig, arm_unit,
    unlearn_config, world_model_unit, WorldEval, align_translation, auc, down_proj_second_moment, encode_texts, eval_items, form_gap, form_texts,
    forget_quality, gold_prob_ks, auc_ci, truth_ratios, perturbed_answers, counterfactual_world, ForgetRetainDataset, make_world, min_k_scores, naive_alignment_errors, narrative_passages, noisy_anchors, npo_loss, null_space_projector,
    operating_point, rocr, rocr_edit, score_items, simnpo_loss, subject_states, text_bpb, train_world_model, unlearn, whp_labels,
    world_documents, world_tokenizer, causal_trace, trace_window, rocr_single_targets, rocr_world, fixed_redirect, RocrRunConfig, rocr_arm_summary)

WORLD = make_world(0, n_generic=24)
TOK = world_tokenizer(WORLD)


def tiny(vocab=None, layers=2, seed=0):
    torch.manual_seed(seed)
    return TinyLM(ModelConfig(vocab_size=vocab or TOK.vocab_size, d_model=32, n_layers=layers, n_heads=2, max_seq_len=256))


# ---------------------------------------------------------------- world, forms, tokenizer
def test_world_is_seeded_and_complete():
    again, other = make_world(0, n_generic=24), make_world(1, n_generic=24)
    assert again.anchors == WORLD.anchors and again.universes["target"].facts == WORLD.universes["target"].facts
    assert other.universes["target"].people != WORLD.universes["target"].people
    for u in UNIVERSES:
        uni = WORLD.universes[u]
        assert len(uni.facts) == len(uni.people) * len(RELATIONS)
        assert all(uni.facts[(p, r)] != p for p in uni.people for r in ("friend", "mentor"))  # nobody is their own friend
    # anchors: every target name and term maps to a distinct generic one
    t, g = WORLD.terms("target"), WORLD.terms("generic")
    assert set(WORLD.anchors) == t and set(WORLD.anchors.values()) <= g
    assert len(set(WORLD.anchors.values())) == len(WORLD.anchors)
    # the invented universes share no names
    names = [WORLD.terms(u) for u in ("target", "neighbour", "holdout")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_bad_world_arguments_are_named():
    with pytest.raises(ValueError, match="n_target"): make_world(0, n_generic=8, n_target=10)
    with pytest.raises(ValueError, match="seed"): make_world(-1)
    with pytest.raises(ValueError, match="form"): eval_items(WORLD, "target", "poem")
    with pytest.raises(ValueError, match="universe"): narrative_passages(WORLD, "elsewhere")
    with pytest.raises(ValueError, match="coverage"): noisy_anchors(WORLD.anchors, 1.5)
    with pytest.raises(ValueError, match="universes"): world_documents(WORLD, ("generic", "holdout"))
    with pytest.raises(ValueError, match="forms"): form_texts(WORLD, "target", forms=("qa", "paraphrase"))


def test_forms_and_training_texts():
    n = len(WORLD.universes["target"].facts)
    for f in FORMS:
        items = eval_items(WORLD, "target", f)
        assert len(items) == (n if f != "reversed" else n * 2 // len(RELATIONS))
        for it in items:
            assert it["answer"] and it["prompt"]
            if "choices" in it: assert it["answer"] in it["choices"]
    # the narrative probe is the passages' own wording; paraphrase templates never occur in any training text
    docs = " ".join(d.text for d in world_documents(WORLD, ("generic", "target", "neighbour")))
    items = eval_items(WORLD, "target", "narrative")
    for it in items:  # the narrative probe is one of the relation's narrative templates, cut before the object
        assert any(t.format(s=it["subject"], o=it["answer"]).startswith(f"{it['prompt']} {it['answer']}") for t in NARRATIVE[it["relation"]])
    assert np.mean([f"{it['prompt']} {it['answer']}" in docs for it in items]) > 0.5  # mostly verbatim: passages use both templates
    for tpl in PARAPHRASES: assert tpl.split("{s}")[0].strip() not in docs
    # the forget set is narrative prose only: target facts appear in cloze/qa training texts too (the original learns every form)
    assert all(p.split(" ")[0] in WORLD.universes["target"].people or True for p in narrative_passages(WORLD, "target"))
    assert len(narrative_passages(WORLD, "target")) == 2 * len(WORLD.universes["target"].people)


def test_noisy_anchors_keep_a_seeded_share():
    a = noisy_anchors(WORLD.anchors, 0.7, seed=3)
    assert len(a) == round(0.7 * len(WORLD.anchors)) and all(WORLD.anchors[k] == v for k, v in a.items())
    assert a == noisy_anchors(WORLD.anchors, 0.7, seed=3) and a != noisy_anchors(WORLD.anchors, 0.7, seed=4)


def test_every_name_is_one_token():
    for u in UNIVERSES:
        for name in WORLD.terms(u): assert len(TOK.encode(name)) == 1 and TOK.encode(name)[0] != TOK.unk_id
    text = narrative_passages(WORLD, "target")[0]
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.byte_lengths[TOK.pad_id] == 0 and TOK.byte_lengths[TOK.stoi["the"]] == 4


def test_encode_texts_labels_are_next_tokens():
    b = encode_texts(TOK, ["a b c", "a"])
    assert b["input_ids"].shape == b["labels"].shape == (2, 3)
    assert b["input_ids"][0, 0] == TOK.eot_id and b["labels"][0].tolist() == TOK.encode("a b c")
    assert b["labels"][1].tolist() == [TOK.stoi["a"], -100, -100] and b["input_ids"][1, 1] == TOK.pad_id


# ---------------------------------------------------------------- evaluator
class _Uniform(torch.nn.Module):
    "Equal logits everywhere: every token has probability 1/V."
    def __init__(self, V):
        super().__init__(); self.V = V; self.config = ModelConfig(vocab_size=V, max_seq_len=512); self.dummy = torch.nn.Parameter(torch.zeros(()))
    def forward(self, ids, **kw):
        from trainlab.model import LMOutput
        return LMOutput(logits=torch.zeros(*ids.shape, self.V) + 0 * self.dummy)


def test_scores_of_a_uniform_model_are_exact():
    V = TOK.vocab_size
    s = score_items(_Uniform(V), TOK, eval_items(WORLD, "target", "qa"))
    assert np.allclose(s["prob"], 1 / V)           # length-normalised: 1/V whatever the answer length
    assert not s["correct"].any() or V == 1       # greedy match of a tie picks token 0 (EOT), never an answer
    texts = narrative_passages(WORLD, "generic")[:3]
    b = encode_texts(TOK, texts); y = b["labels"][b["labels"] != -100]
    expect_bpb = len(y) * math.log2(V) / TOK.byte_lengths[y].sum().item()
    assert text_bpb(_Uniform(V), TOK, texts) == pytest.approx(expect_bpb, rel=1e-6)


def test_score_items_matches_a_hand_computation():
    m = tiny().eval()
    it = eval_items(WORLD, "target", "spelled")[0]  # a multi-token answer
    p, a = [TOK.eot_id] + TOK.encode(it["prompt"]), TOK.encode(" " + it["answer"])
    lp = torch.log_softmax(m(torch.tensor([p + a])).logits[0], -1)
    want = math.exp(sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(a)) / len(a))
    assert score_items(m, TOK, [it])["prob"][0] == pytest.approx(want, rel=1e-5)
    mc = eval_items(WORLD, "target", "mcq")[0]
    p = [TOK.eot_id] + TOK.encode(mc["prompt"])
    last = m(torch.tensor([p])).logits[0, -1]
    pick = "ABCD"[int(last[[TOK.stoi[c] for c in "ABCD"]].argmax())]
    assert bool(score_items(m, TOK, [mc])["correct"][0]) == (pick == mc["answer"])


def test_auc_forget_quality_and_min_k():
    assert auc([2, 3], [0, 1]) == 1.0 and auc([0, 1], [2, 3]) == 0.0 and auc([1, 1], [1, 1]) == 0.5
    x = np.linspace(0, 1, 50)
    assert gold_prob_ks(x, x)["gold_prob_ks_p"] == pytest.approx(1.0) and gold_prob_ks(x, x + 2)["gold_prob_ks_p"] < 1e-6
    fq = forget_quality(x, x + 2)
    assert fq["forget_quality"] < 1e-6 and fq["forget_quality_d"] == pytest.approx(1.0)  # disjoint samples: D = 1
    a, lo, hi = auc_ci([0.9, 0.2, 0.8, 0.7], [0.1, 0.3, 0.5, 0.6], paired=True)
    assert a == auc([0.9, 0.2, 0.8, 0.7], [0.1, 0.3, 0.5, 0.6]) and lo <= a <= hi
    with pytest.raises(ValueError, match="neg"): auc_ci([1, 2], [1], paired=True)
    m = tiny()
    s = min_k_scores(m, TOK, ["a b c d e", "a b"], k=0.4)
    b = encode_texts(TOK, ["a b c d e"])
    lp = torch.log_softmax(m(b["input_ids"]).logits[0], -1).gather(-1, b["labels"][0, :, None]).squeeze(-1).sort().values
    assert s[0] == pytest.approx(lp[:2].mean().item(), rel=1e-5)  # 40% of 5 tokens -> the 2 lowest
    with pytest.raises(ValueError, match="k"): min_k_scores(m, TOK, ["a"], k=0)


def _scores(**probs):
    return {"forms": {f: {"prob": p, "acc": p} for f, p in probs.items()}}


def test_form_gap_is_normalised_by_the_oracle():
    orig = _scores(narrative=0.8, qa=0.9, mcq=0.6)
    oracle = _scores(narrative=0.0, qa=0.1, mcq=0.25)  # mcq has a chance floor
    # narrative fully forgotten, qa halfway to the oracle, mcq at the oracle's chance level
    r = form_gap(_scores(narrative=0.0, qa=0.5, mcq=0.25), orig, oracle)
    assert r["closed"] == pytest.approx(dict(narrative=1.0, qa=0.5, mcq=1.0))
    assert r["form_gap"] == pytest.approx(1.0 - 0.75) and r["form_gap_std"] == pytest.approx(0.25)
    assert form_gap(oracle, orig, oracle)["form_gap"] == pytest.approx(0.0)  # the oracle itself: no form dependence


def test_operating_point_respects_the_budgets():
    orig = dict(retain_bpb=1.0, neighbour_acc=0.9)
    path = [dict(retain_bpb=1.01, neighbour_acc=0.9), dict(retain_bpb=1.04, neighbour_acc=0.86), dict(retain_bpb=1.2, neighbour_acc=0.9)]
    assert operating_point(path, orig, 0.05, 0.05) == 1
    assert operating_point(path, orig, 0.05, 0.01) == 0 and operating_point(path[2:], orig, 0.05, 0.05) is None  # none within budget


def test_world_eval_reports_every_metric():
    ev = WorldEval(WORLD, TOK)
    r = ev(tiny())
    assert set(r["forms"]) == set(FORMS) == set(r["neighbour_forms"])
    assert len(r["item_probs"]) == sum(len(v) for v in ev.items["target"].values())
    for k in ("familiarity", "familiarity_prob", "mia_auc", "mia_auc_unseen_names", "generic_qa_acc", "neighbour_acc"): assert 0 <= r[k] <= 1, k
    assert r["retain_bpb"] > 0 and len(r["truth_ratios"]) == len(ev.tr_items) and (r["truth_ratios"] > 0).all()


def test_truth_ratios_follow_tofus_definition():
    m, items = tiny(), eval_items(WORLD, "target", "qa")[:5]
    wrong = perturbed_answers(WORLD, items)
    gold = np.log(score_items(m, TOK, items)["prob"])
    bad = np.array([np.mean([np.log(score_items(m, TOK, [dict(it, answer=a)])["prob"][0]) for a in ws]) for it, ws in zip(items, wrong)])
    assert truth_ratios(m, TOK, items, wrong) == pytest.approx(np.exp(bad - gold), rel=1e-4)
    with pytest.raises(ValueError, match="wrong"): truth_ratios(m, TOK, items, wrong[:2])


def test_counterfactual_passages_share_tokens_not_facts():
    cf = counterfactual_world(WORLD)
    real, fake = narrative_passages(WORLD, "target"), narrative_passages(cf, "target")
    assert len(real) == len(fake) and all(len(a.split()) == len(b.split()) for a, b in zip(real, fake))
    assert {w for t in fake for w in t.split()} <= {w for t in real for w in t.split()}  # every non-member token is a trained token
    assert all(cf.universes["target"].facts[k] != o for k, o in WORLD.universes["target"].facts.items())


def test_forget_retain_dataset_uses_every_retain_passage():
    f = encode_texts(TOK, narrative_passages(WORLD, "target")[:4]); r = encode_texts(TOK, narrative_passages(WORLD, "generic")[:20])
    ds = ForgetRetainDataset(f, r, seed=3)
    seen = {bytes(ds[i % 4]["retain"]["input_ids"].numpy()) for i in range(400)}
    assert len(seen) == 20


# ---------------------------------------------------------------- WHP
def test_word_alignment_is_one_to_one_and_masks_repeats():
    text = narrative_passages(WORLD, "target")[0]
    a = align_translation(TOK, text, WORLD.anchors)
    assert len(a["orig_ids"]) == len(a["trans_ids"]) == len(a["src"]) + 1
    seen = set()
    for t, s in enumerate(a["src"]):
        tok = TOK.itos[a["orig_ids"][t + 1]]
        if tok in WORLD.anchors and tok in seen: assert s == -1     # copying a name already in context stays generic
        else:
            assert s == t
            want = WORLD.anchors.get(tok, tok)
            assert TOK.itos[a["trans_ids"][s + 1]] == want
        if tok in WORLD.anchors: seen.add(tok)
    assert naive_alignment_errors(TOK, narrative_passages(WORLD, "target"), WORLD.anchors)["misaligned"] == 0


def test_byte_alignment_reads_the_corresponding_position():
    bt = ByteTokenizer()
    texts = narrative_passages(WORLD, "target")[:6]
    for text in texts:
        a = align_translation(bt, text, WORLD.anchors)
        trans = bt.decode(a["trans_ids"][1:])
        assert trans == " ".join(WORLD.anchors.get(w, w) for w in text.split(" "))
        labelled = [(t, s) for t, s in enumerate(a["src"]) if s >= 0]
        assert labelled and len(labelled) < len(a["src"])               # anchor continuations are unlabelled
        for t, s in labelled:
            o, tr = a["orig_ids"][t + 1], a["trans_ids"][s + 1]
            # the base reads the translated prefix and predicts the corresponding token: equal outside anchors, the generic word's first byte at an anchor
            assert o == tr or (chr(o).isalpha() and chr(tr).isalpha())
    # the shortcut (same index, truncated) reads the wrong position for most labels once a name was replaced
    assert naive_alignment_errors(bt, texts, WORLD.anchors)["share"] > 0.5


def test_whp_labels_follow_the_formula():
    base, reinf = tiny(seed=1), tiny(seed=2)
    texts = narrative_passages(WORLD, "target")[:3]
    out = whp_labels(base, reinf, TOK, texts, WORLD.anchors, alpha=2.0, impl="torch")
    for i, text in enumerate(texts):
        a = align_translation(TOK, text, WORLD.anchors)
        vb = base(torch.tensor([a["trans_ids"]])).logits[0]; vr = reinf(torch.tensor([a["orig_ids"]])).logits[0]
        for t, s in enumerate(a["src"]):
            want = -100 if s < 0 else int(generic_labels_ref(vb[s], vr[t], alpha=2.0))
            assert int(out["labels"][i, t]) == want
    assert (out["input_ids"][:, 0] == TOK.eot_id).all() and 0 <= out["changed"] <= 1
    # ablations: anchors only = the baseline's argmax on translated text; reinforced only reads the original text
    ao = whp_labels(base, None, TOK, texts[:1], WORLD.anchors, impl="torch")
    a = align_translation(TOK, texts[0], WORLD.anchors)
    arg = base(torch.tensor([a["trans_ids"]])).logits[0].argmax(-1)
    assert all(int(ao["labels"][0, t]) == (-100 if s < 0 else int(arg[s])) for t, s in enumerate(a["src"]))
    ro = whp_labels(base, reinf, TOK, texts[:1], None, impl="torch")
    assert (ro["labels"][0] != -100).all()
    with pytest.raises(ValueError, match="reinforced"): whp_labels(base, None, TOK, texts, None)


def test_whp_labels_on_bytes():
    bt = ByteTokenizer()
    base, reinf = tiny(258, seed=1), tiny(258, seed=2)
    text = narrative_passages(WORLD, "target")[0][:120]
    out = whp_labels(base, reinf, bt, [text], WORLD.anchors, impl="torch")
    a = align_translation(bt, text, WORLD.anchors)
    vb = base(torch.tensor([a["trans_ids"]])).logits[0]; vr = reinf(torch.tensor([a["orig_ids"]])).logits[0]
    for t, s in enumerate(a["src"]):
        assert int(out["labels"][0, t]) == (-100 if s < 0 else int(generic_labels_ref(vb[s], vr[t])))


def test_generic_logits_lm():
    base, reinf = tiny(seed=1), tiny(seed=2)
    x = encode_texts(TOK, ["a b c"])["input_ids"]
    v = GenericLogitsLM(base, reinf, 0.5)(x).logits
    vb, vr = base(x).logits, reinf(x).logits
    assert torch.allclose(v, vb - 0.5 * torch.relu(vr - vb))
    with pytest.raises(ValueError, match="alpha"): GenericLogitsLM(base, reinf, -1)


# ---------------------------------------------------------------- losses and the Lightning module
def test_npo_and_simnpo_losses():
    lp = torch.tensor([-3.0, -5.0])
    assert npo_loss(lp, lp, 0.1).item() == pytest.approx(20 * math.log(2))
    assert npo_loss(lp - 10, lp, 0.1) < npo_loss(lp, lp, 0.1)          # pushing the forget set down lowers the loss
    nll = torch.tensor([1.0, 2.0])
    assert simnpo_loss(nll, 4.5).item() == pytest.approx(-(2 / 4.5) * torch.nn.functional.logsigmoid(4.5 * nll).mean().item())


def _forget_retain():
    return encode_texts(TOK, narrative_passages(WORLD, "target")[:8]), encode_texts(TOK, narrative_passages(WORLD, "generic")[:8])


def _mean_nll(m, b):
    with torch.no_grad():
        loss = m(b["input_ids"], labels=b["labels"]).loss
    return (loss.sum() / (b["labels"] != -100).sum()).item()


@pytest.mark.parametrize("method", ["grad_ascent", "graddiff", "graddiff_kl", "npo", "simnpo"])
def test_unlearning_methods_raise_the_forget_loss(method):
    f, r = _forget_retain()
    m0 = tiny()
    # SimNPO's sigmoid saturates at a random model's NLL (~6 nats) with beta = 4.5: a smaller beta, and no retain term, isolates its forget term
    kw = dict(beta=0.5, retain_weight=0.0) if method == "simnpo" else {}
    m, _ = unlearn(m0, method, f, r, unlearn_config(3, lr=1e-2, batch_size=4), **kw)
    assert _mean_nll(m, f) > _mean_nll(m0, f)
    assert not any(p is q for p, q in zip(m.parameters(), m0.parameters()))  # the input model is untouched


def test_finetune_lowers_the_loss_of_its_labels_and_probes_record_the_path():
    f, _ = _forget_retain()
    m0 = tiny()
    m, pts = unlearn(m0, "finetune", f, cfg=unlearn_config(4, lr=1e-2, batch_size=4), probe_steps=(2, 4), probe=lambda mm, s: _mean_nll(mm, f))
    assert [p[0] for p in pts] == [2, 4] and pts[-1][2] == pytest.approx(_mean_nll(m, f)) and pts[-1][2] < _mean_nll(m0, f)
    assert pts[0][1] <= pts[1][1]  # train seconds grow along the path


def test_graddiff_kl_uses_the_kl_of_reference_and_model():
    f, r = _forget_retain()
    m, ref = tiny(seed=1), tiny(seed=2)
    lit = UnlearnLitModule(m, "graddiff_kl", ref_model=ref, impl="torch")
    batch = {"forget": {k: v[:2] for k, v in f.items()}, "retain": {k: v[:2] for k, v in r.items()}}
    lit.log = lambda *a, **k: None
    loss = lit.training_step(batch, 0)
    mask = r["labels"][:2] != -100
    kl = kl_div_ref(ref(r["input_ids"][:2]).logits[mask], m(r["input_ids"][:2]).logits[mask], reduction="mean")
    fl = m(f["input_ids"][:2], labels=f["labels"][:2]).loss
    want = -(fl.sum() / (f["labels"][:2] != -100).sum()) + kl
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_unlearn_arguments_are_checked():
    f, r = _forget_retain()
    with pytest.raises(ValueError, match="method"): UnlearnLitModule(tiny(), "forget_harder")
    with pytest.raises(ValueError, match="ref_model"): UnlearnLitModule(tiny(), "npo")
    with pytest.raises(ValueError, match="steps"): unlearn(tiny(), "grad_ascent", f, cfg=unlearn_config(0))
    with pytest.raises(ValueError, match="method"): unlearn(tiny(), "forget_harder", f)
    with pytest.raises(TypeError, match="cfg"): unlearn(tiny(), "grad_ascent", f, cfg={"steps": 3})
    with pytest.raises(ValueError, match="batch_size"): ForgetRetainDataModule(f, r, batch_size=99)


# ---------------------------------------------------------------- ROCR
def test_rocr_edit_is_rank_one_and_moves_the_subject_to_the_redirect():
    m = tiny(layers=3)
    s, g = WORLD.universes["target"].people[0], WORLD.anchors[WORLD.universes["target"].people[0]]
    _, h0 = subject_states(m, TOK, [s], [1])
    _, z = subject_states(m, TOK, [g], [1])
    W0 = m.layers[1].mlp.down_proj.weight.detach().clone()
    info = rocr_edit(m, TOK, [s], [g], [1], lam=1e-6)
    assert info["rank"] == [1] and info["edit_s"] > 0
    _, h1 = subject_states(m, TOK, [s], [1])
    assert (h1 - z).norm() < 0.05 * (h0 - z).norm()                   # one layer, tiny lambda: the residual lands on z
    assert not torch.equal(W0, m.layers[1].mlp.down_proj.weight)


def test_rocr_projection_leaves_generic_directions_alone():
    m = tiny(layers=2)
    texts = narrative_passages(WORLD, "generic")
    mom = down_proj_second_moment(m, TOK, texts, [0])
    P = null_space_projector(mom[0], 1e-2)
    assert torch.allclose(P @ P, P, atol=1e-8) and 0 < int(torch.trace(P).round()) < P.shape[0]
    W0 = m.layers[0].mlp.down_proj.weight.detach().double().clone()
    people = WORLD.universes["target"].people[:4]
    rocr_edit(m, TOK, people, [WORLD.anchors[p] for p in people], [0], {0: P})
    dW = m.layers[0].mlp.down_proj.weight.detach().double() - W0
    keep = torch.eye(P.shape[0], dtype=torch.float64) - P               # the directions generic text uses
    assert (dW @ keep).norm() < 1e-4 * dW.norm()                        # Delta^T k0 = 0 for every generic key k0
    _, info = rocr(m, TOK, WORLD, layers=(0,), project=True, moments=mom)
    assert info["null_dims"][0] == int(torch.trace(P).round())
    with pytest.raises(ValueError, match="moments"): rocr(m, TOK, WORLD, layers=(1,), project=True, moments=mom)
    with pytest.raises(ValueError, match="layers"): rocr_edit(m, TOK, people, people, [5])
    with pytest.raises(ValueError, match="redirects"): rocr_edit(m, TOK, people, people[:1], [0])


# ---------------------------------------------------------------- two processes
class _UnlearnRanksAgree(L.Callback):
    "Fails the run unless the ranks see disjoint forget rows of one global batch and hold identical weights after every step."
    def __init__(self, forget_rows): self.rows = forget_rows
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x = trainer.strategy.all_gather(batch["forget"]["input_ids"])
        rows = [tuple(r.tolist()) for r in x.reshape(-1, x.shape[-1])]
        assert len(set(rows)) == len(rows) and all(r in self.rows for r in rows), "ranks overlap or read rows outside the forget set"
        flat = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])
        g = trainer.strategy.all_gather(torch.stack([flat.sum(), flat.norm()]))
        assert torch.equal(g[0], g[1]), "ranks hold different weights"
        pl_module.log("train/world", float(trainer.world_size))

    def on_train_end(self, trainer, pl_module):  # the training-free pieces run per rank and agree too
        m, _ = rocr(pl_module.model, TOK, WORLD, layers=(0,), project=False)
        fam = WorldEval(WORLD, TOK).familiarity(m)
        g = trainer.strategy.all_gather(torch.tensor([fam["familiarity"], fam["familiarity_prob"], m.layers[0].mlp.down_proj.weight.sum().item()]))
        assert torch.equal(g[0], g[1]), "ranks disagree on ROCR / the evaluator"


@pytest.mark.parametrize("method", ["finetune", "grad_ascent", "graddiff", "graddiff_kl", "npo", "simnpo"])
def test_ddp_two_processes_unlearn(method):
    f, r = _forget_retain()
    rows = {tuple(x.tolist()) for x in f["input_ids"]}
    m0 = tiny()
    m, _ = unlearn(m0, method, f, r, unlearn_config(2, lr=1e-2, batch_size=2), callbacks=[_UnlearnRanksAgree(rows)],
                   accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert not torch.equal(m.layers[0].mlp.down_proj.weight, m0.layers[0].mlp.down_proj.weight)  # trained weights came back


def test_ddp_two_processes_train_the_world_model():
    cfg = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=256), seq_len=32, batch_size=4, steps=3, warmup_steps=1)
    m, info = train_world_model(WORLD, TOK, ("generic", "target"), cfg, accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert math.isfinite(info["val_bpb"]) and info["universes"] == ["generic", "target"]
    m1, _ = train_world_model(WORLD, TOK, ("generic", "target"), cfg)
    assert not torch.equal(m.embed.weight, m1.embed.weight)  # two ranks saw twice the windows: a different run than one process


def test_subject_patching_with_the_subject_itself_changes_nothing():
    import dataclasses
    m = tiny(layers=2)
    same = dataclasses.replace(WORLD, anchors={k: k for k in WORLD.anchors})
    from trainlab.unlearning import subject_patching
    for layer in (0, 1):
        got = subject_patching(m, TOK, same, layer, forms=("qa", "mcq"))
        for f, p in got.items():
            assert p == pytest.approx(float(score_items(m, TOK, eval_items(WORLD, "target", f))["prob"].mean()), rel=1e-5)
    # patching with the redirect does change the scores (the model reads the subject token)
    other = subject_patching(m, TOK, WORLD, 0, forms=("qa",))["qa"]
    assert other != pytest.approx(float(score_items(m, TOK, eval_items(WORLD, "target", "qa"))["prob"].mean()), rel=1e-6)


def test_whp_labels_edge_cases():
    base = tiny(seed=1)
    p = WORLD.universes["target"].people[0]
    a = align_translation(TOK, f"{p} {p}", WORLD.anchors)
    assert a["src"] == [0, -1]  # the first mention is read from the translated text, the repeat stays unlabelled
    out = whp_labels(base, None, TOK, [f"{p} {p}"], WORLD.anchors, impl="torch")
    first = int(base(torch.tensor([a["trans_ids"]])).logits[0, 0].argmax())
    assert out["labels"].tolist() == [[first, -100]]
    none = whp_labels(base, None, TOK, [""], WORLD.anchors, impl="torch")  # nothing to label: no kernel call, no error
    assert none["labels"].shape == (1, 0) and none["changed"] == 0.0
    text = narrative_passages(WORLD, "target")[0]
    full = whp_labels(base, tiny(seed=2), TOK, [text], WORLD.anchors, impl="torch")
    cut = whp_labels(base, tiny(seed=2), TOK, [text], WORLD.anchors, max_len=20, impl="torch")
    assert cut["labels"].shape == (1, 20) and torch.equal(cut["labels"][0], full["labels"][0, :20])  # causal: truncation keeps the labels


# ---------------------------------------------------------------- registries, configs and the one training path
def test_forms_come_from_one_registry():
    assert FORMS == tuple(FORM_RENDERERS) and "paraphrase" not in TRAINED_FORMS and "narrative" not in HELD_OUT_FORMS
    assert set(TRAINED_FORMS) | set(HELD_OUT_FORMS) == set(FORMS)
    for f in FORMS:  # every renderer gives the fields the evaluator reads, and mcq/tf their choices
        for it in eval_items(WORLD, "neighbour", f):
            assert it["form"] == f and it["universe"] == "neighbour" and isinstance(it["prompt"], str)
            assert ("choices" in it) == (f in ("mcq", "tf"))


def test_unlearn_methods_registry_drives_the_module():
    assert set(UNLEARN_METHODS) == {"finetune", "grad_ascent", "graddiff", "graddiff_kl", "npo", "simnpo"}
    for name, spec in UNLEARN_METHODS.items():
        lit = UnlearnLitModule(tiny(), name, ref_model=tiny(seed=1) if spec.needs_ref else None)
        assert lit.beta == spec.beta and lit.forget_weight == spec.forget_weight
        assert not any(isinstance(v, torch.nn.Module) for v in lit.hparams.values())  # the reference model is no hyperparameter
        assert lit.hparams.schedule == "constant" and tuple(lit.hparams.betas) == (0.9, 0.999) and lit.hparams.weight_decay == 0.0
    # grad_ascent has no retain term: a retain batch changes nothing; graddiff adds CE_r
    f, r = _forget_retain()
    b = {"forget": {k: v[:2] for k, v in f.items()}, "retain": {k: v[:2] for k, v in r.items()}}
    m = tiny()
    ga, gd = UnlearnLitModule(m, "grad_ascent"), UnlearnLitModule(m, "graddiff", retain_weight=0.5)
    for lit in (ga, gd): lit.log = lambda *a, **k: None
    nll_r = m(b["retain"]["input_ids"], labels=b["retain"]["labels"]).loss
    ce_r = nll_r.sum() / (b["retain"]["labels"] != -100).sum()
    assert ga.training_step(b, 0).item() == pytest.approx(ga.training_step({"forget": b["forget"]}, 0).item())
    assert gd.training_step(b, 0).item() == pytest.approx(ga.training_step(b, 0).item() + 0.5 * ce_r.item(), rel=1e-5)


def test_unlearn_config_and_fit_follow_the_seed():
    cfg = unlearn_config(3, lr=1e-2, batch_size=2, base=TrainConfig(seed=5, impl="torch"))
    assert (cfg.seed, cfg.impl, cfg.warmup_steps, cfg.schedule, cfg.weight_decay) == (5, "torch", 0, "constant", 0.0)
    f, r = _forget_retain()
    a, _ = unlearn(tiny(), "npo", f, r, cfg)
    b, _ = unlearn(tiny(), "npo", f, r, cfg)
    c, _ = unlearn(tiny(), "npo", f, r, cfg.replace(seed=6))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))          # paired: same seed, same run
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))      # another seed, another data order


def test_run_config_embeds_train_config():
    full, fast = UnlearnRunConfig.full(seed=1), UnlearnRunConfig.fast(seed=1)
    assert isinstance(full.train, TrainConfig) and full.train.seed == 1 and full.train.steps == 800 and fast.train.steps < full.train.steps
    u = fast.unlearn_train(7)
    assert (u.steps, u.lr, u.batch_size, u.seed, u.schedule) == (7, fast.unlearn_lr, fast.unlearn_batch_size, 1, "constant")
    bf = UnlearnRunConfig(train=fast.train.replace(precision="bf16-mixed", impl="torch"))
    assert bf.unlearn_train(2).precision == "bf16-mixed" and bf.unlearn_train(2).impl == "torch"
    assert UnlearnRunConfig(train=dict(steps=60)).train.steps == 60
    with pytest.raises(ValueError, match="ga_steps"): UnlearnRunConfig(ga_steps=())
    with pytest.raises(ValueError, match="n_generic"): UnlearnRunConfig(n_generic=4)
    with pytest.raises(TypeError, match="train"): UnlearnRunConfig(train=3)
    # one registry of arms, every claim about a registered arm
    assert all(a in UNLEARN_ARMS for c in UNLEARN_CLAIMS for a in c.arms)
    assert {a.family for a in UNLEARN_ARMS.values()} == {"whp", "gradient", "rocr"}


def _tiny_run(seed=0):
    cfg = UnlearnRunConfig.fast(seed)
    cfg.train = TrainConfig(model=ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=256), steps=6, warmup_steps=1, batch_size=4,
                            seq_len=32, val_every=3, seed=seed)
    return SeedRun(cfg, seed)


def test_world_model_units_save_the_weights_and_arms_reuse_them(tmp_path):
    s = _tiny_run()
    for name in WORLD_MODELS:
        s.units[name] = world_model_unit(s, name, tmp_path / name)
        assert (tmp_path / name / "model.pt").is_file() and not (tmp_path / name / "checkpoints").exists()
        assert s.units[name]["train"]["universes"] == list(WORLD_MODELS[name])
    again = SeedRun(s.cfg, 0); again.units = s.units  # a resumed run: the model comes from the file, identical
    assert all(torch.equal(p, q) for p, q in zip(s.model("orig").parameters(), again.model("orig").parameters()))
    assert s.units["orig"]["scores"]["familiarity"] == pytest.approx(s.ev(again.model("orig"))["familiarity"])
    out = arm_unit(s, "grad_ascent")
    assert len(out["path"]) == len(s.cfg.ga_steps)
    if out["within_budget"]: assert out["operating_point"] in [p["param"] for p in out["path"]]
    else: assert out["operating_point"] is None and out["familiarity_gap_closed"] in (0.0, None) or math.isnan(out["familiarity_gap_closed"])
    for k in ("form_gap", "familiarity_gap_closed", "retain_bpb_rel", "neighbour_acc", "forget_quality", "gold_prob_ks_p", "mia_auc"): assert k in out
    with pytest.raises(ValueError, match="arm"): arm_unit(s, "forget_everything")
    with pytest.raises(ValueError, match="name"): s.model("reinforced")


def test_pieces_world_names_share_pieces_and_default_world_is_unchanged():
    w = make_world(1, name_pieces=2)
    people = [p for u in w.universes.values() for p in u.people]
    assert len(set(people)) == len(people) and all(len(p.split()) == 2 for p in people)
    firsts = [p.split()[0] for p in people]
    assert max(firsts.count(x) for x in set(firsts)) > 1  # no first piece names one person
    assert make_world(1).universes["target"].people == make_world(1, name_pieces=1).universes["target"].people
    tok = world_tokenizer(w)
    assert all(len(tok.encode(p)) == 2 and tok.unk_id not in tok.encode(p) for p in w.universes["target"].people)
    with pytest.raises(ValueError, match="piece_pool"): make_world(0, name_pieces=3, piece_pool=3)
    with pytest.raises(ValueError, match="name_pieces"): make_world(0, name_pieces=0)


def _tiny(tok, layers=3, seed=0):
    torch.manual_seed(seed)
    return TinyLM(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=layers, n_heads=2, max_seq_len=256)).eval()


def test_causal_trace_bounds_and_leaves_no_hooks():
    w = make_world(0, n_generic=24, name_pieces=2); tok = world_tokenizer(w); m = _tiny(tok)
    items = eval_items(w, "target", "cloze")[:12] + eval_items(w, "target", "reversed")[:3]  # reversed prompts lack the subject: skipped
    tr = causal_trace(m, tok, items, n_noise=2)
    assert tr["n_items"] == 12 and tr["layers"] == [0, 1, 2]
    assert abs(tr["resid_last"][-1] - 1) < 1e-4 and abs(tr["resid_subject"][-1]) < 1e-4  # after the last block only the answer position matters
    assert tr == causal_trace(m, tok, items, n_noise=2)  # seeded
    assert not m.embed._forward_hooks and not any(l._forward_hooks or l.mlp._forward_hooks for l in m.layers)
    with pytest.raises(ValueError, match="items"): causal_trace(m, tok, eval_items(w, "target", "reversed")[:3])


def test_trace_window_ends_at_the_mlp_peak():
    assert trace_window({"mlp_subject": [0.0, 0.1, 0.6, 0.2, 0.0]}, 3) == [0, 1, 2]
    assert trace_window({"mlp_subject": [0.0, 0.1, 0.2, 0.2, 0.7]}, 2) == [3, 4]
    assert trace_window({"mlp_subject": [float("nan"), 0.3, 0.1]}, 1) == [1]
    with pytest.raises(ValueError, match="width"): trace_window({"mlp_subject": [0.1, 0.2]}, 3)


def test_rocr_single_targets_edits_copies_one_subject_at_a_time():
    cfg = RocrRunConfig.fast()
    w, tok = rocr_world(cfg, 0); m = _tiny(tok, layers=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    people = w.universes["target"].people[:2]
    r = rocr_single_targets(m, tok, w, [0, 1], None, cfg, targets=people)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert r["n_targets"] == 2 and r["redirect"] == fixed_redirect(w) and len(r["neighbour_acc_per_edit"]) == 2
    n_items = {f: sum(it["subject"] in people for it in eval_items(w, "target", f)) for f in FORMS}
    assert all(0 <= r["forms"][f]["prob"] <= 1 for f in FORMS) and n_items["qa"] == 2 * len(RELATIONS)


def test_rocr_arm_summary_against_the_reference():
    o = {"forms": {f: {"prob": 0.9} for f in FORMS}, "neighbour_acc": 0.8, "retain_bpb": 2.0}
    ref = {"forms": {f: {"prob": 0.1} for f in FORMS}}
    s = {"forms": {f: {"prob": 0.1} for f in FORMS}, "neighbour_acc": 0.8, "retain_bpb": 2.0}
    a = rocr_arm_summary(s, o, ref)
    assert a["closed_mean"] == pytest.approx(1.0) and a["form_gap"] == pytest.approx(0.0) and a["neighbour_drop"] == 0 and a["retain_bpb_rel"] == 0
