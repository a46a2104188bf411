"""Unlearning on a Hugging Face causal LM: the gradient methods (GA, GradDiff, NPO, SimNPO), WHP's
reinforced model and generic labels, the form-wise evaluator with Min-K% and truth ratios, and the
causal trace and ROCR at the MLP down-projections of chosen layers. The model is a tiny Llama or
Qwen2 whose vocabulary is the fictional world's, so the world's tokenizer is the model's."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")

from trainlab.hf import CausalLMAdapter, tiny_causal_lm  # noqa: E402
from trainlab.train import LMLitModule, TrainConfig, fit  # noqa: E402
from trainlab.unlearning import (GenericLogitsLM, WorldEval, causal_trace,  # noqa: E402
                                 down_proj_second_moment, encode_texts, eval_items, make_world,
                                 narrative_passages, rocr, unlearn, unlearn_config, whp_labels,
                                 world_tokenizer)


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, n_generic=20, n_target=4, n_other=4)


@pytest.fixture(scope="module")
def tok(world):
    return world_tokenizer(world)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, world, tok):
    "A tiny Llama or Qwen2 that has read the world's narrative for a few steps."
    model = tiny_causal_lm(request.param, vocab_size=tok.vocab_size, max_position_embeddings=256)
    b = encode_texts(tok, narrative_passages(world, "target") + narrative_passages(world, "generic"),
                     128)
    cfg = unlearn_config(12, lr=3e-3, batch_size=8)
    m, _ = unlearn(model, "finetune", b, cfg=cfg, accelerator="cpu")
    return m


def test_unlearn_returns_the_hf_model_trained(world, tok, trained):
    kind = type(trained)
    assert kind.__name__.endswith("ForCausalLM")  # the model itself, not the adapter
    forget = encode_texts(tok, narrative_passages(world, "target"), 128)
    retain = encode_texts(tok, narrative_passages(world, "generic"), 128)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    for method in ("grad_ascent", "graddiff", "npo", "simnpo"):
        m, _ = unlearn(trained, method, forget, retain, cfg=unlearn_config(2, lr=1e-3, batch_size=4),
                       accelerator="cpu")
        assert type(m) is kind
        assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items()), method
    # a copy was unlearned: the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())


def test_whp_generic_labels_and_logits_with_a_hf_model(world, tok, trained):
    texts = narrative_passages(world, "target")[:4]
    lab = whp_labels(trained, trained, tok, texts, anchors=world.anchors)
    assert lab["labels"].shape == lab["input_ids"].shape and 0.0 <= lab["changed"] <= 1.0
    g = GenericLogitsLM(trained, trained, alpha=1.0)
    ids = lab["input_ids"][:2]
    torch.testing.assert_close(g(ids).logits, trained(ids).logits)  # relu(v - v) = 0


def test_the_formwise_evaluator_reads_a_hf_model(world, tok, trained):
    ev = WorldEval(world, tok)
    r = ev(trained, mia=True)
    assert set(r["forms"]) == set(ev.forms)
    assert all(0.0 <= v["prob"] <= 1.0 for v in r["forms"].values())
    assert math.isfinite(r["retain_bpb"]) and 0.0 <= r["familiarity"] <= 1.0
    assert np.isfinite(r["truth_ratios"]).all() and 0.0 <= r["mia_auc"] <= 1.0
    # the same numbers through the adapter
    r2 = ev(CausalLMAdapter(trained), mia=False)
    assert r2["forms"] == {f: r["forms"][f] for f in r2["forms"]}


def test_causal_trace_and_rocr_at_chosen_down_projections(world, tok, trained):
    items = eval_items(world, "target", "narrative")[:6]
    tr = causal_trace(trained, tok, items, n_noise=2)
    assert tr["layers"] == [0, 1] and len(tr["mlp_subject"]) == 2
    assert 0.0 <= tr["p_corrupt"] <= 1.0 and 0.0 <= tr["p_clean"] <= 1.0
    mom = down_proj_second_moment(trained, tok, narrative_passages(world, "generic"), [0])
    assert mom[0].shape == (trained.config.intermediate_size,) * 2
    edited, info = rocr(trained, tok, world, layers=[0], moments=mom)
    assert type(edited) is type(trained) and info["rank"][0] >= 1
    # only the chosen layer's down-projection moved
    moved = {k for k, v in edited.state_dict().items()
             if not torch.equal(v, trained.state_dict()[k])}
    assert moved == {"model.layers.0.mlp.down_proj.weight"}


def test_save_pretrained_after_unlearning_round_trips(world, tok, trained, tmp_path):
    from transformers import AutoModelForCausalLM
    forget = encode_texts(tok, narrative_passages(world, "target"), 128)
    m, _ = unlearn(trained, "grad_ascent", forget, cfg=unlearn_config(2, lr=1e-3, batch_size=4),
                   accelerator="cpu")
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = forget["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, m.eval()(ids).logits)
