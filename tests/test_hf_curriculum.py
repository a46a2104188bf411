"""The curriculum on a Hugging Face causal LM: Dataset Decomposition's buckets and sampler over a
Hugging Face tokenizer's token stream, its batches training the model through `curriculum_fit`,
and document-masked concat-and-chunk batches that keep documents apart inside the model."""
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")
pytest.importorskip("tokenizers", reason="the Hugging Face tests need `pip install tokenizers`")

from trainlab.curriculum import CurriculumDataModule, curriculum_fit  # noqa: E402
from trainlab.hf import (CausalLMAdapter, HFTokenizer, corpus_text, tiny_causal_lm,  # noqa: E402
                         train_bpe_tokenizer)
from trainlab.train import LMLitModule, TrainConfig  # noqa: E402

FOLDER = str(Path(__file__).resolve().parents[1] / "data" / "tiny" / "folder")


@pytest.fixture
def tok(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINLAB_CACHE", str(tmp_path / "cache"))
    return HFTokenizer(train_bpe_tokenizer(corpus_text(FOLDER), vocab_size=300))


def _dm(tok, **kw):
    return CurriculumDataModule(corpus=FOLDER, tokens_per_step=256, num_steps=6, eval_window=64,
                                max_eval_tokens=2048, val_frac=0.3, tokenizer=tok, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dd_batches_of_a_hf_tokenizer_train_a_hf_model(arch, tok):
    dm = _dm(tok, mode="dd", min_log2=3, max_log2=6, curriculum="grow_p2", cycles=2)
    dm.setup()
    # every bucket holds pieces of its length, cut from the tokenizer's own stream
    assert dm.buckets.lengths == [8, 16, 32, 64]
    shapes = [tuple(b["input_ids"].shape) for b in dm.train_dataloader()]
    assert len(shapes) == 6 and all(B * L == 256 for B, L in shapes)
    assert len({L for _, L in shapes}) > 1  # the length changes across steps
    b = next(iter(dm.train_dataloader()))
    assert int(b["input_ids"].max()) < tok.vocab_size and "doc_ids" not in b
    model = tiny_causal_lm(arch, vocab_size=tok.vocab_size)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=64, warmup_steps=1, val_every=3)
    lit, hist, _ = curriculum_fit(cfg, lambda: LMLitModule(model, byte_lengths=tok.byte_lengths,
                                                           **cfg.lit_kwargs()), dm,
                                  accelerator="cpu")
    assert isinstance(lit.model, CausalLMAdapter) and lit.model.hf is model
    assert [r["step"] for r in hist.val] == [3, 6]
    assert all(math.isfinite(r["val/bpb"]) for r in hist.val)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_doc_masked_chunks_keep_documents_apart_in_a_hf_model(attn, tok, tmp_path):
    short = tmp_path / "short_docs"  # many short documents: most 64-token windows cross a boundary
    short.mkdir()
    for i, para in enumerate(corpus_text(FOLDER).split("\n\n")[:40]):
        (short / f"doc{i:02d}.txt").write_text(para[:120] + "\n")
    dm = CurriculumDataModule(corpus=str(short), mode="cc", seq_len=64, doc_mask=True,
                              tokens_per_step=256, num_steps=4, eval_window=64,
                              max_eval_tokens=1024, val_frac=0.2, tokenizer=tok)
    dm.setup()
    rows = [(ids, doc) for b in dm.train_dataloader()
            for ids, doc in zip(b["input_ids"], b["doc_ids"])]
    ids, doc = next((i, d) for i, d in rows if len(torch.unique(d)) > 1)  # a row with a boundary
    a = CausalLMAdapter(tiny_causal_lm("llama", vocab_size=tok.vocab_size, attn_implementation=attn))
    a.eval()
    full = a(ids[None], doc_ids=doc[None]).logits[0]
    cuts = [0] + [i for i in range(1, len(doc)) if doc[i] != doc[i - 1]] + [len(doc)]
    for lo, hi in zip(cuts, cuts[1:]):  # each document alone gives the same logits
        torch.testing.assert_close(full[lo:hi], a(ids[None, lo:hi]).logits[0], rtol=1e-4,
                                   atol=1e-4)
    # without the mask a later document would see the earlier one
    lo = cuts[1]
    assert (a(ids[None]).logits[0, lo:] - full[lo:]).abs().max() > 1e-3
