"""MoE layers in a Hugging Face causal LM: `swap_mlps` with BlockFFN and the baselines, their
auxiliary losses in the training loss, the routing metrics on the swapped model, the coefficient
callbacks, and `save_pretrained` / `load_swapped`."""
import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")

from trainlab.data import LMDataModule  # noqa: E402
from trainlab.hf import CausalLMAdapter, load_swapped, moe_arm_ffn, swap_mlps, tiny_causal_lm  # noqa: E402
from trainlab.moe import (BlockFFN, MOE_ARMS, MoEConfig, MoELitModule, ReMoE, TopKMoE,  # noqa: E402
                          collect_router_scores, evaluate_routing)
from trainlab.train import TrainConfig, fit  # noqa: E402


def _batch(L=128, vocab=258):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, L), generator=g)
    return dict(input_ids=ids, labels=torch.roll(ids, -1, 1),
                doc_ids=torch.tensor([[0] * (L // 2) + [1] * (L // 2), [2] * L]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("arm, cls, losses", [("blockffn", BlockFFN, {"chunk", "locality"}),
                                              ("topk", TopKMoE, {"balance"}),
                                              ("remoe", ReMoE, {"remoe_l1"})])
def test_the_aux_losses_of_swapped_layers_reach_the_training_loss(arch, arm, cls, losses):
    model = tiny_causal_lm(arch)
    slots = swap_mlps(model, moe_arm_ffn(arm))
    assert [type(s.ffn) for s in slots] == [cls, cls]
    if arm == "remoe":  # ReMoE's L1 coefficient starts near zero; any value shows the path
        for s in slots: s.ffn.l1_coef.fill_(1e-2)
    lit = MoELitModule(model)
    b = _batch()
    out = lit.model(b["input_ids"], labels=b["labels"], doc_ids=b["doc_ids"])
    assert set(out.aux_losses) == losses
    # each averaged over the swapped layers, as TinyLM averages its own
    for k in losses:
        per = [a["losses"][k] for a in out.aux]
        torch.testing.assert_close(out.aux_losses[k], sum(per) / len(per))
    lm, _ = lit.lm_loss(out, b)
    total = lm + sum(out.aux_losses.values())
    total.backward()
    router = next(p for n, p in slots[0].ffn.named_parameters() if "router" in n)
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_routing_metrics_read_the_swapped_model():
    model = tiny_causal_lm("llama")
    swap_mlps(model, moe_arm_ffn("blockffn"))
    a = CausalLMAdapter(model)
    scores, docs, inputs = collect_router_scores(a, [_batch()])
    assert len(scores) == 2 and scores[0].shape == (2, 128, MoEConfig().n_experts)
    assert inputs[0].shape == (2, 128, model.config.hidden_size)
    r = evaluate_routing(scores, docs)
    assert len(r["per_layer"]) == 2 and 0.0 <= r["tls"] <= 1.0


def test_a_partial_swap_leaves_the_other_blocks_alone():
    model = tiny_causal_lm("qwen2", num_hidden_layers=3)
    own = type(model.model.layers[0].mlp)
    swap_mlps(model, moe_arm_ffn("topk"), layers=[1])
    assert type(model.model.layers[0].mlp) is own and type(model.model.layers[2].mlp) is own
    out = CausalLMAdapter(model)(_batch()["input_ids"], labels=_batch()["labels"])
    assert [bool(a) for a in out.aux] == [False, True, False] and "balance" in out.aux_losses
    with pytest.raises(ValueError, match="layers"):
        swap_mlps(model, moe_arm_ffn("topk"), layers=[3])


def test_blockffn_trains_in_a_hf_model_with_its_chunk_schedule():
    model = tiny_causal_lm("llama")
    swap_mlps(model, moe_arm_ffn("blockffn"))
    cfg = TrainConfig(steps=6, warmup_steps=1, batch_size=4, seq_len=64, val_every=3, lr=3e-3)
    dm = LMDataModule(corpus="stdlib_code", seq_len=64, batch_size=4, max_eval_tokens=2048)
    arm, moe = MOE_ARMS["blockffn"], MoEConfig()
    lit, hist, _ = fit(cfg, lambda: MoELitModule(model, **cfg.lit_kwargs()), dm,
                       callbacks=arm.callbacks(moe, cfg.steps), accelerator="cpu")
    assert all(torch.isfinite(torch.tensor(r["val/bpb"])) for r in hist.val)
    logged = hist.train[-1]
    assert "train/aux/chunk" in logged and "train/chunk_coef" in logged and "train/tls" in logged


def test_save_pretrained_then_load_swapped(tmp_path):
    model = tiny_causal_lm("qwen2")
    swap_mlps(model, moe_arm_ffn("blockffn"))
    model.save_pretrained(tmp_path)
    back = load_swapped(tmp_path, moe_arm_ffn("blockffn"))
    assert isinstance(back.model.layers[1].mlp.ffn, BlockFFN)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(CausalLMAdapter(back.eval())(ids).logits,
                                   CausalLMAdapter(model.eval())(ids).logits)
    with pytest.raises(ValueError, match="path"):
        plain = tiny_causal_lm("qwen2")
        plain.save_pretrained(tmp_path / "plain")
        load_swapped(tmp_path / "plain", moe_arm_ffn("blockffn"))
