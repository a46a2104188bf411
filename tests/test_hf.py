"""Hugging Face causal LMs on trainlab's training path: the adapter's losses and document masks,
byte lengths of Hugging Face tokenizers, `fit` on a tiny Llama, and the `save_pretrained` /
`from_pretrained` round trip."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers",
                                   reason="the Hugging Face tests need `pip install transformers`")
pytest.importorskip("tokenizers", reason="the Hugging Face tests need `pip install tokenizers`")

from trainlab.data import LMDataModule  # noqa: E402
from trainlab.hf import (  # noqa: E402
    CausalLMAdapter, HFTokenizer, byte_level_tokenizer, corpus_text, document_positions,
    has_plain_lm_head, is_causal_lm, tiny_causal_lm, tokenizer_byte_lengths, train_bpe_tokenizer,
    wrap_causal_lm)
from trainlab.model import ModelConfig, TinyLM  # noqa: E402
from trainlab.tokens import ByteTokenizer  # noqa: E402
from trainlab.train import LMLitModule, TrainConfig, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["llama", "qwen2"]
ATTN = ["eager", "sdpa"]


def shifted_for_hf(labels):
    "trainlab's labels (each position's target) as a Hugging Face model's (it shifts them itself)."
    return torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], 1)


def batch(B=3, L=40, vocab=258, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
    labels[0, :7] = -100  # a prompt that is not trained on
    labels[-1, L // 2:L // 2 + 5] = -100
    return ids, labels


def test_importing_trainlab_hf_imports_no_transformers():
    code = ("import sys, trainlab.hf, trainlab.hf.models, trainlab.hf.tokenization\n"
            "import trainlab.model, trainlab.sharding\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')]\n"
            "assert not bad, sorted(bad)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("fused", [True, False])
def test_adapter_loss_and_gradients_equal_the_models_own(arch, attn, fused):
    m = tiny_causal_lm(arch, attn_implementation=attn)
    ids, labels = batch()
    hf_loss = m(ids, labels=shifted_for_hf(labels), use_cache=False).loss
    (hf_grad,) = torch.autograd.grad(hf_loss, [m.model.layers[0].mlp.up_proj.weight])
    out = CausalLMAdapter(m, fused_loss=fused)(ids, labels)
    assert out.loss.shape == ids.shape and out.logits is None
    assert out.loss[labels == -100].abs().max() == 0
    loss = out.loss.sum() / (labels != -100).sum()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, [m.model.layers[0].mlp.up_proj.weight])
    torch.testing.assert_close(grad, hf_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_triton_loss_kernels_give_the_models_own_loss(fused, dev):
    m = tiny_causal_lm("qwen2").to(dev)
    ids, labels = (t.to(dev) for t in batch(B=2, L=16))
    hf_loss = m(ids, labels=shifted_for_hf(labels), use_cache=False).loss
    a = CausalLMAdapter(m, fused_loss=fused)
    a.impl = "triton"  # what TrainConfig(impl="triton") sets through set_impl
    gid = (torch.arange(16, device=dev) >= 6).long().expand(2, 16)
    out = a(ids, labels, groups=(gid, 2))
    torch.testing.assert_close(out.loss.sum() / (labels != -100).sum(), hf_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.group_loss_sum.sum(), out.loss.sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTN)
def test_documents_in_a_packed_row_match_each_document_alone(arch, attn):
    a = CausalLMAdapter(tiny_causal_lm(arch, attn_implementation=attn))
    ids, labels = batch(B=2, L=30)
    doc = torch.tensor([[0] * 8 + [1] * 12 + [2] * 10, [3] * 30])
    out = a(ids, labels, doc_ids=doc, return_logits=True)
    for lo, hi in ((0, 8), (8, 20), (20, 30)):  # document 2 is the middle one
        alone = a(ids[:1, lo:hi], labels[:1, lo:hi], return_logits=True)
        torch.testing.assert_close(out.logits[0, lo:hi], alone.logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss[0, lo:hi], alone.loss[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1], a(ids[1:]).logits[0], rtol=1e-5, atol=1e-5)
    # without the mask the middle document would see the first one
    assert (a(ids).logits[0, 8:20] - out.logits[0, 8:20]).abs().max() > 1e-3


def test_document_positions_restart_per_segment():
    seg, pos = document_positions(torch.tensor([[4, 4, 4, 7, 7, 4]]))
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]] and seg.tolist() == [[1, 1, 1, 2, 2, 3]]


def test_bf16_autocast_with_documents_runs_on_both_routes():
    m = tiny_causal_lm("qwen2")
    ids, labels = batch(B=2, L=16)
    doc = (torch.arange(16) >= 5).long().expand(2, 16)
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = CausalLMAdapter(m, fused_loss=fused)(ids, labels, doc_ids=doc)
        assert torch.isfinite(out.loss).all() and out.loss.sum() > 0


def test_groups_and_internals():
    m = tiny_causal_lm("llama")
    a = CausalLMAdapter(m)
    ids, labels = batch(B=2, L=24)
    gid = (torch.arange(24) >= 10).long().expand(2, 24)
    out = a(ids, labels, groups=(gid, 2), outputs=("hidden_states", "mlp_inputs"))
    torch.testing.assert_close(out.group_loss_sum.sum(), out.loss.sum())
    counted = [int((labels[:, :10] != -100).sum()), int((labels[:, 10:] != -100).sum())]
    assert out.group_count.tolist() == counted
    ref = m(ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(out.hidden_states) == 3 and len(out.mlp_inputs) == 2
    torch.testing.assert_close(out.hidden_states[0], ref[0])
    # TinyLM's convention: the last entry is the last block's output, before the final norm
    torch.testing.assert_close(m.model.norm(out.hidden_states[-1]), ref[-1])
    out.hidden_states[1].sum().backward()  # internals stay in the graph
    assert m.model.layers[0].mlp.up_proj.weight.grad is not None


def test_head_choice_follows_the_config():
    m = tiny_causal_lm("llama")
    assert has_plain_lm_head(m) and CausalLMAdapter(m).fused_loss
    m.config.final_logit_softcapping = 30.0  # the fused kernel would miss it: the logits route is taken
    assert not has_plain_lm_head(m) and not CausalLMAdapter(m).fused_loss
    with pytest.raises(ValueError, match="`fused_loss`"):
        CausalLMAdapter(m, fused_loss=True)


def test_doc_ids_need_a_masked_attention_implementation():
    m = tiny_causal_lm("llama")
    m.config._attn_implementation = "flash_attention_2"
    ids, _ = batch(B=1, L=8)
    with pytest.raises(ValueError, match="`doc_ids`"):
        CausalLMAdapter(m)(ids, doc_ids=torch.zeros_like(ids))


def test_doc_ids_within_a_sliding_window_only():
    a = CausalLMAdapter(tiny_causal_lm("qwen2", use_sliding_window=True, sliding_window=8,
                                       max_window_layers=0))
    ids, _ = batch(B=1, L=16)
    doc = (torch.arange(16) >= 4).long()[None]
    torch.testing.assert_close(a(ids[:, :8], doc_ids=doc[:, :8]).logits[0, 4:],
                               a(ids[:, 4:8]).logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sliding window"):
        a(ids, doc_ids=doc)


def test_only_hf_causal_lms_are_wrapped():
    m = tiny_causal_lm("qwen2")
    assert is_causal_lm(m) and not is_causal_lm(m.model)
    tiny = TinyLM(ModelConfig(d_model=32, n_layers=1, n_heads=2))
    assert LMLitModule(tiny).model is tiny and wrap_causal_lm(tiny) is tiny
    lit = LMLitModule(m)
    assert isinstance(lit.model, CausalLMAdapter) and lit.model.hf is m
    assert LMLitModule(lit.model).model is lit.model  # an adapter is not wrapped twice
    with pytest.raises(TypeError, match="`model`"):
        CausalLMAdapter(tiny)


def test_byte_level_tokenizer_has_one_byte_per_byte_token():
    tok = byte_level_tokenizer()
    text = "naïve café ✓ 𝔘\tdef f(x):\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == ByteTokenizer().encode(text)
    bl = tokenizer_byte_lengths(tok)
    assert bl.tolist() == [1] * 256 + [0, 0]
    assert int(bl[ids].sum()) == len(text.encode("utf-8"))


def test_trained_bpe_byte_lengths_add_up_to_the_texts_bytes():
    tok = train_bpe_tokenizer(corpus_text("stdlib_code", 60_000), vocab_size=512)
    bl = tokenizer_byte_lengths(tok)
    assert len(bl) == len(tok) == 512 and bl[:2].tolist() == [0, 0]  # the special tokens
    assert bl[2:].min() >= 1 and bl.max() > 4  # merges span several bytes
    code = corpus_text("stdlib_code", 8_000, seed=3)[-4000:]
    for text in (code, "Grüße, 世界! 🎉 naïve\r\n\ttabs"):
        ids = tok.encode(text, add_special_tokens=False)
        assert int(bl[ids].sum()) == len(text.encode("utf-8"))


def sentencepiece_like_tokenizer():
    "A tiny Llama-2-style tokenizer: BPE over `▁`-marked words, byte fallback, 3 special tokens."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    bpe = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_tokens_are_one_byte_and_specials_none():
    tok = sentencepiece_like_tokenizer()
    bl = tokenizer_byte_lengths(tok)
    assert bl[:3].tolist() == [0, 0, 0] and bl[3:259].tolist() == [1] * 256
    assert bl[tok.convert_tokens_to_ids("▁the")] == 4 and bl[tok.convert_tokens_to_ids("he")] == 2
    text = "the cat ate a crème brûlée"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert any(3 <= i < 259 for i in ids)  # é and û fell back to bytes
    # one byte more: the `▁` prepended to the first word
    assert int(bl[ids].sum()) == len(text.encode("utf-8")) + 1
    assert int(tokenizer_byte_lengths(tok.backend_tokenizer)[ids].sum()) == int(bl[ids].sum())


@pytest.mark.filterwarnings("ignore:.*not UTF-8 text", "ignore:.*small-corpus fallback")
def test_hf_tokenizer_feeds_the_data_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINLAB_CACHE", str(tmp_path / "cache"))
    folder = ROOT / "data" / "tiny" / "folder"
    tok = HFTokenizer(train_bpe_tokenizer(corpus_text(str(folder)), vocab_size=300))
    assert tok.byte_lengths[tok.eot_id] == 1 and tok.byte_lengths[tok.pad_id] == 0
    dm = LMDataModule(corpus=str(folder), seq_len=16, batch_size=2, tokenizer=tok, val_frac=0.3)
    dm.setup()
    for c in (dm.train_corpus, dm.val_corpus):
        assert int(tok.byte_lengths[torch.as_tensor(c.tokens.astype("int64"))].sum()) == c.n_bytes
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (2, 16) and int(b["input_ids"].max()) < tok.vocab_size


@pytest.mark.slow
def test_fit_trains_a_tiny_llama_and_save_pretrained_round_trips(tmp_path):
    tok = ByteTokenizer()
    cfg = TrainConfig(steps=24, warmup_steps=3, batch_size=8, seq_len=64, lr=3e-3, val_every=12)
    dm = LMDataModule(corpus="stdlib_code", seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                      max_eval_tokens=4096, tokenizer=tok)
    model = lambda: tiny_causal_lm("llama", vocab_size=tok.vocab_size)  # noqa: E731
    lit, hist, _ = fit(cfg, lambda: LMLitModule(model(), **cfg.lit_kwargs()), dm)
    assert isinstance(lit.model, CausalLMAdapter)
    # the byte lengths come from the datamodule's tokenizer
    assert torch.equal(lit.byte_lengths.cpu(), tok.byte_lengths.float())
    first, last = hist.train[0]["train/lm_loss"], hist.train[-1]["train/lm_loss"]
    assert last < first - 0.5, (first, last)
    assert len(hist.val) == 2 and hist.val[-1]["val/bpb"] < hist.val[0]["val/bpb"] < 8.0
    last = hist.val[-1]
    assert last["val/bpb"] == pytest.approx(last["val/loss"] / math.log(2), rel=0.05)

    hf = lit.model.hf.eval()
    hf.save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    x = torch.tensor([back_tok.encode("def main():\n    return 0\n", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits)
    assert tokenizer_byte_lengths(back_tok).tolist() == tok.byte_lengths.tolist()[:256] + [0, 0]
    # the reloaded model continues to train through the same module
    assert isinstance(LMLitModule(back).model, CausalLMAdapter)
