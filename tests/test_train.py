import math
import pytest
import torch
import torch.nn as nn

from trainlab.model import ModelConfig, TinyLM
from trainlab.train import LMLitModule, History, TrainConfig, make_trainer, train_lm, lr_factor, bits_per_byte, ReleaseProcessGroup
from trainlab.data import LMDataModule

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


def tiny_cfg(**kw):
    base = dict(corpus="stdlib_prose", seq_len=32, batch_size=4, steps=8, warmup_steps=2, val_every=4,
                max_eval_tokens=2048, model=TINY)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_shape():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(20, 4, 20, min_lr_ratio=0.1) == pytest.approx(0.1)
    vals = [lr_factor(s, 4, 20) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # cosine decays monotonically
    assert lr_factor(15, 4, 20, schedule="constant") == 1.0


def test_bits_per_byte():
    assert bits_per_byte(math.log(2) * 10, 10) == pytest.approx(1.0)


def test_training_reduces_loss_and_logs_everything():
    lit, hist, trainer = train_lm(tiny_cfg(steps=30, val_every=15))
    keys = set(trainer.callback_metrics)
    assert {"train/loss", "train/lm_loss", "train/lr", "train/tokens", "train/tokens_per_s", "val/loss", "val/bpb"} <= keys
    assert len(hist.val) == 2 and hist.val[-1]["val/bpb"] < hist.val[0]["val/bpb"] < 8.0
    assert hist.train[-1]["tokens"] == 30 * 4 * 32
    assert hist.val[-1]["val/bpb"] == pytest.approx(hist.val[-1]["val/loss"] / math.log(2), rel=0.05)  # byte tokenizer: ~1 byte per token


def test_seeded_run_is_reproducible():
    _, h1, _ = train_lm(tiny_cfg())
    _, h2, _ = train_lm(tiny_cfg())
    assert abs(h1.val[-1]["val/bpb"] - h2.val[-1]["val/bpb"]) < 1e-6
    assert abs(h1.train[-1]["train/loss"] - h2.train[-1]["train/loss"]) < 1e-6
    _, h3, _ = train_lm(tiny_cfg(seed=1))
    assert abs(h1.val[-1]["val/bpb"] - h3.val[-1]["val/bpb"]) > 1e-6


class AuxFFN(nn.Module):
    def __init__(self, cfg, i):
        super().__init__(); self.l = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
    def forward(self, x):
        y = self.l(x)
        return y, {"losses": {"l2": 0.25 * y.pow(2).mean()}}


def test_aux_losses_are_added_and_logged():
    lit, hist, trainer = train_lm(tiny_cfg(steps=3, val_every=3), model=TinyLM(TINY, ffn=AuxFFN))
    m = trainer.callback_metrics
    assert "train/aux/l2" in m
    assert (m["train/loss"] - m["train/lm_loss"]).item() == pytest.approx(m["train/aux/l2"].item(), rel=1e-5)


def test_sample_weights_hook():
    lit = LMLitModule(TINY)
    ids = torch.randint(0, 256, (3, 8)); labels = ids.clone(); labels[2, 4:] = -100
    out = lit.model(ids, labels=labels)
    plain, per_seq = lit.lm_loss(out, {"labels": labels})
    assert plain.item() == pytest.approx((out.loss.sum() / (labels != -100).sum()).item())
    w = torch.tensor([1.0, 0.0, 3.0])
    weighted, _ = lit.lm_loss(out, {"labels": labels, "weight": w})
    assert weighted.item() == pytest.approx(((per_seq * w).sum() / w.sum()).item())
    lit.sample_weighter = lambda losses, step: (losses == losses.max()).float()  # all weight on the hardest sequence
    hardest, _ = lit.lm_loss(out, {"labels": labels})
    assert hardest.item() == pytest.approx(per_seq.max().item())


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="schedule"): LMLitModule(TINY, schedule="linear")
    with pytest.raises(ValueError, match="lr"): LMLitModule(TINY, lr=0)
    with pytest.raises(ValueError, match="model"): LMLitModule(model=42)
    with pytest.raises(ValueError, match="max_steps"): make_trainer(0)


_EXIT_PROBE = """
import atexit, sys, torch.distributed as dist
from trainlab.train import ReleaseProcessGroup
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))  # LIFO: runs after the clean-up
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
ReleaseProcessGroup().setup(None, None, "fit")
ReleaseProcessGroup().setup(None, None, "fit")  # a second trainer in the same process registers nothing more
print("registered:", ReleaseProcessGroup.registered, flush=True)
"""


def test_release_process_group_destroys_gloo_at_exit(tmp_path):
    """A rank that leaves a gloo group alive can abort in gloo's teardown after training succeeded; the callback destroys it at exit."""
    import subprocess, sys
    out = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(tmp_path / "store")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["registered:", "True", "initialized", "at", "exit:", "False"]
    ReleaseProcessGroup().setup(None, None, "fit")  # without a process group (this process): nothing registered
    assert not ReleaseProcessGroup.registered


def test_ddp_two_processes_on_cpu():
    """Lightning DDP with two gloo processes on CPU: both ranks train, validation sums are reduced across ranks."""
    dm = LMDataModule(corpus="stdlib_prose", seq_len=32, batch_size=4, max_eval_tokens=2048)
    lit = LMLitModule(TINY, warmup_steps=2, max_steps=6)
    before = [p.detach().clone() for p in lit.model.parameters()]
    trainer = make_trainer(6, val_every=6, accelerator="cpu", devices=2, strategy="ddp_spawn")
    trainer.fit(lit, datamodule=dm)
    assert trainer.world_size == 2
    bpb = float(trainer.callback_metrics["val/bpb"])
    assert 0 < bpb < 8.5
    assert float(trainer.callback_metrics["train/tokens"]) == 6 * 4 * 32 * 2  # tokens counted over both ranks
    assert any(not torch.equal(a, b) for a, b in zip(before, lit.model.parameters()))  # rank 0's weights came back
    # validation sums are exact under DDP (no repeated windows): one process on the same weights agrees
    single = make_trainer(1, accelerator="cpu").validate(lit, datamodule=dm, verbose=False)[0]
    assert single["val/bpb"] == pytest.approx(bpb, rel=1e-5)
