import math
import pytest
import torch
import torch.nn as nn

from trainlab.model import ModelConfig, TinyLM, count_parameters, generate, record_activations, sdpa_attention, document_causal_mask

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


def test_forward_shapes_and_loss_matches_logits():
    m = TinyLM(CFG)
    ids = torch.randint(0, 258, (3, 11))
    out = m(ids, labels=ids, return_logits=True)
    assert out.logits.shape == (3, 11, 258) and out.loss.shape == (3, 11)
    ref = nn.functional.cross_entropy(out.logits.reshape(-1, 258), ids.reshape(-1), reduction="none").view(3, 11)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)


def test_ignored_labels_give_zero_loss_and_no_gradient_signal():
    m = TinyLM(CFG)
    ids = torch.randint(0, 258, (2, 8)); labels = ids.clone(); labels[:, :4] = -100
    out = m(ids, labels=labels)
    assert torch.all(out.loss[:, :4] == 0) and torch.all(out.loss[:, 4:] > 0)


def test_tied_embeddings_and_parameter_counts():
    m = TinyLM(CFG)
    assert m.lm_head.weight is m.embed.weight
    c = count_parameters(m)
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert c["non_embedding"] == c["total"] - 258 * 32 and c["active"] == c["total"]
    untied = count_parameters(TinyLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, tie_embeddings=False)))
    assert untied["total"] == c["total"] + 258 * 32


def test_active_parameters_hook_for_routed_ffns():
    class HalfActive(nn.Module):
        def __init__(self, cfg, i):
            super().__init__(); self.a = nn.Linear(cfg.d_model, cfg.d_model, bias=False); self.b = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        def forward(self, x): return self.a(x)
        def active_parameters(self): return self.a.weight.numel()
    m = TinyLM(CFG, ffn=HalfActive)
    c = count_parameters(m)
    assert c["total"] - c["active"] == 2 * 32 * 32


def test_causal_and_document_masking():
    m = TinyLM(CFG).eval()
    ids = torch.randint(0, 256, (1, 12))
    doc = torch.tensor([[0] * 5 + [1] * 7])
    a = m(ids, doc_ids=doc).logits
    ids2 = ids.clone(); ids2[0, :5] = 3
    b = m(ids2, doc_ids=doc).logits
    torch.testing.assert_close(a[:, 5:], b[:, 5:])
    assert not torch.allclose(m(ids).logits[:, 5:], m(ids2).logits[:, 5:])  # without doc_ids the change leaks forward


def test_document_mask_never_has_empty_rows():
    doc = torch.randint(0, 3, (4, 17)).sort(-1).values
    assert document_causal_mask(doc).any(-1).all()
    q = k = v = torch.randn(4, 2, 17, 8)
    assert torch.isfinite(sdpa_attention(q, k, v, doc_ids=doc)).all()


def test_pluggable_attention_and_ffn_are_called():
    calls = []
    def attn(q, k, v, causal=True, doc_ids=None):
        calls.append(doc_ids is not None); return sdpa_attention(q, k, v, causal, doc_ids)
    class AuxFFN(nn.Module):
        def __init__(self, cfg, i): super().__init__(); self.l, self.i = nn.Linear(cfg.d_model, cfg.d_model), i
        def forward(self, x, doc_ids=None): return self.l(x), {"losses": {"z": x.new_tensor(1.0 + self.i)}}
    m = TinyLM(CFG, ffn=AuxFFN, attention=attn)
    ids = torch.randint(0, 256, (2, 6))
    out = m(ids, labels=ids, doc_ids=torch.zeros_like(ids))
    assert calls == [True, True] and out.aux_losses["z"].item() == pytest.approx(1.5)  # the mean of layers' 1.0 and 2.0, not the sum


def test_hidden_states_mlp_inputs_and_activation_recording():
    m = TinyLM(CFG)
    ids = torch.randint(0, 256, (2, 6))
    with record_activations(m, "layers.*.mlp.down_proj") as acts:
        out = m(ids, outputs=("hidden_states", "mlp_inputs"))
    assert len(out.hidden_states) == CFG.n_layers + 1 and len(out.mlp_inputs) == CFG.n_layers
    assert acts["layers.1.mlp.down_proj"][0].shape == (2, 6, CFG.d_ff)
    with pytest.raises(ValueError, match="patterns"):
        with record_activations(m, "nope.*"): pass


def test_generate_greedy_is_deterministic_and_respects_eos():
    m = TinyLM(CFG)
    p = torch.randint(0, 256, (2, 3))
    a, b = generate(m, p, 5), generate(m, p, 5)
    assert torch.equal(a, b) and a.shape == (2, 8)
    nxt = a[0, 3].item()
    c = generate(m, p, 5, eos_id=nxt)
    assert (c[0, 3:] == nxt).all()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="n_heads"): ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="d_model"): ModelConfig(d_model=6, n_heads=2)
    m = TinyLM(CFG)
    with pytest.raises(ValueError, match="input_ids"): m(torch.randint(0, 9, (1, 33)))
    with pytest.raises(ValueError, match="input_ids"): m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="labels"): m(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"): generate(m, torch.zeros(3, dtype=torch.long), 2, temperature=-1)


def test_eval_mode_restores_the_mode_even_after_an_error():
    from trainlab.model import eval_mode
    m = torch.nn.Dropout(0.5)
    with eval_mode(m): assert not m.training
    assert m.training
    m.eval()
    with pytest.raises(RuntimeError):
        with eval_mode(m): m.train(); raise RuntimeError("boom")
    assert not m.training  # the mode from before the block, not the one set inside it
