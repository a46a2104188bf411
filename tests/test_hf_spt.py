"""SPT on a Hugging Face causal LM: the mixture DataModule, pretraining with un-annealed snapshots
and the finetuning grid, with the model's own tokenizer (bits per byte from its byte lengths)."""
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install transformers`")
pytest.importorskip("tokenizers", reason="the Hugging Face tests need `pip install tokenizers`")

from trainlab.data import Document, TokenizedCorpus, split_corpus  # noqa: E402
from trainlab.hf import HFTokenizer, corpus_text, tiny_causal_lm, train_bpe_tokenizer  # noqa: E402
from trainlab.spt import FinetuneConfig, SPTConfig, finetune_grid, make_domain, pretrain  # noqa: E402
from trainlab.train import TrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer(train_bpe_tokenizer(corpus_text(max_chars=60_000), vocab_size=320))


@pytest.fixture(scope="module")
def general(tok):
    text = corpus_text(max_chars=60_000, seed=1)
    docs = [Document(f"g{i}", p) for i, p in enumerate(text.split("\n\n")) if p.strip()]
    return split_corpus(TokenizedCorpus.from_documents(docs, tok), val_frac=0.2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_spt_pretrains_and_finetunes_a_hf_model_with_its_tokenizer(arch, tok, general):
    dom = make_domain("unicode_names", train_tokens=1200, test_tokens=500, report_tokens=400,
                      tokenizer=tok, seed=0)
    assert dom.train.n_tokens > 0 and int(dom.train.tokens.max()) < tok.vocab_size
    model = tiny_causal_lm(arch, vocab_size=tok.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SPTConfig(TrainConfig(steps=8, batch_size=4, seq_len=64, warmup_steps=2, val_every=4,
                                lr=3e-3), max_general_eval_tokens=2048, checkpoint_fracs=(0.5, 1.0))
    r = pretrain(dom, 0.25, cfg, general_corpus=general, model=model, tokenizer=tok,
                 accelerator="cpu")
    # the user's model is copied, never trained in place
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(r["snapshots"]) == [4, 8] and r["mixture"]["realised_delta"] == 0.25
    gv = r["datamodule"].general_eval
    ft = finetune_grid(r["snapshots"][8], model, dom, gv,
                       FinetuneConfig(cfg.train.replace(batch_size=4, schedule="constant",
                                                        weight_decay=1e-7),
                                      lrs=(1e-3, 3e-3), warmups=(1,), max_epochs=2),
                       tokenizer=tok, accelerator="cpu")
    pre, post = ft["pre_ft"], ft["post_ft"]
    assert all(math.isfinite(v) for v in pre.values())
    assert post["domain_test_bpb"] <= pre["domain_test_bpb"]  # step 0 is a candidate
    assert ft["forgetting"] == pytest.approx(post["general_bpb"] - pre["general_bpb"])
    # the general bpb along the curves, and the pipeline agrees with itself: the checkpoint's
    # general bpb is the last pretraining validation's
    assert all(p[2] is not None for g in ft["grid"] for p in g["curve"])
    assert pre["general_bpb"] == pytest.approx(r["metrics"]["val/general_bpb"], rel=1e-4)

