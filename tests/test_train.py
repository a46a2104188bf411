import math
import pytest
import torch
import torch.nn as nn
import lightning as L

from trainlab.model import ModelConfig, TinyLM
from trainlab.train import (LMLitModule, History, TrainConfig, make_trainer, fit, lr_factor, bits_per_byte, ReleaseProcessGroup,
                            ResumableLoader, set_impl)
from trainlab.data import LMDataModule

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


def tiny_cfg(**kw):
    base = dict(seq_len=32, batch_size=4, steps=8, warmup_steps=2, val_every=4, model=TINY)
    base.update(kw)
    return TrainConfig(**base)


def tiny_data(cfg):
    return LMDataModule(corpus="stdlib_prose", seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_eval_tokens=2048, seed=cfg.seed)


def train_lm(cfg, model=None, **kw):
    "The one training path on the tiny corpus: the module is built after fit seeds."
    return fit(cfg, lambda: LMLitModule(model if model is not None else cfg.model, **cfg.lit_kwargs()), tiny_data(cfg), **kw)


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
    assert isinstance(lit.model.layers[0].mlp, AuxFFN)
    m = trainer.callback_metrics
    assert "train/aux/l2" in m
    # loss - lm_loss cancels two float32 values near 5 (spacing 4.8e-7): compare at that absolute precision
    assert (m["train/loss"] - m["train/lm_loss"]).item() == pytest.approx(m["train/aux/l2"].item(), abs=2e-6)
    assert m["train/aux/l2"].item() > 1e-3  # and the aux loss is far above that precision


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
    with pytest.raises(ValueError, match="precision"): tiny_cfg(precision="fp8")
    with pytest.raises(ValueError, match="impl"): tiny_cfg(impl="cuda")
    with pytest.raises(ValueError, match="steps"): tiny_cfg(steps=0)
    with pytest.raises(TypeError, match="cfg"): fit({"steps": 3}, LMLitModule(TINY), tiny_data(tiny_cfg()))
    with pytest.raises(TypeError, match="lit"): fit(tiny_cfg(), lambda: 42, tiny_data(tiny_cfg()))


@pytest.mark.parametrize("changes, msg", [
    (dict(seq_len=64), "`seq_len`: expected at most model.max_seq_len (32)"),
    (dict(steps=True), "`steps`: expected a positive int (not a bool)"),
    (dict(steps=8.0), "`steps`"),
    (dict(batch_size=0), "`batch_size`"),
    (dict(warmup_steps=9), "`warmup_steps`: expected an int in [0, steps] = [0, 8]"),
    (dict(warmup_steps=-1), "`warmup_steps`"),
    (dict(lr=0.0), "`lr`: expected a finite number > 0"),
    (dict(lr=float("nan")), "`lr`"),
    (dict(lr=float("inf")), "`lr`"),
    (dict(lr=True), "`lr`"),
    (dict(min_lr_ratio=1.5), "`min_lr_ratio`"),
    (dict(weight_decay=-0.1), "`weight_decay`"),
    (dict(weight_decay=float("inf")), "`weight_decay`"),
    (dict(grad_clip=0.0), "`grad_clip`"),
    (dict(grad_clip=float("nan")), "`grad_clip`"),
    (dict(seed=-1), "`seed`"),
    (dict(seed=False), "`seed`"),
    (dict(val_every=0), "`val_every`"),
])
def test_train_config_is_checked_when_built(changes, msg):
    with pytest.raises(ValueError) as e: tiny_cfg(**changes)
    assert msg in str(e.value)
    assert tiny_cfg(warmup_steps=8, grad_clip=None, lr=1, min_lr_ratio=0).warmup_steps == 8  # the edges are allowed


def test_fit_seeds_the_initialisation_of_a_factory():
    """Paired seeds: the same seed gives the same initial weights whatever ran before; another seed differs."""
    cfg = tiny_cfg(steps=1, warmup_steps=1, val_every=None)
    inits = []
    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module): inits.append(pl_module.model.embed.weight.detach().clone())
    for seed in (0, 0, 1):
        torch.manual_seed(1234 + len(inits))  # whatever the global state was before
        fit(cfg.replace(seed=seed), lambda: LMLitModule(TINY, **cfg.lit_kwargs()), tiny_data(cfg), callbacks=[Grab()])
    assert torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], inits[2])


def test_impl_and_precision_reach_the_run():
    lit = LMLitModule(TINY)
    set_impl(lit, "torch")
    impls = [m.impl for m in lit.modules() if hasattr(m, "impl")]
    assert impls and set(impls) == {"torch"}
    _, hist, trainer = train_lm(tiny_cfg(steps=4, val_every=4, precision="bf16-mixed", impl="torch"))
    assert "bf16" in str(trainer.precision) or trainer.precision == "bf16-mixed"
    assert 0 < hist.val[-1]["val/bpb"] < 8.5


class _Crash(L.Callback):
    def __init__(self, at): self.at = at
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at: raise RuntimeError("simulated crash")


def test_fit_resumes_exactly_from_its_checkpoint(tmp_path):
    """Killed after a validation, resumed from run_dir: the same curves and final numbers as an uninterrupted run (across epochs)."""
    cfg = tiny_cfg(steps=40, val_every=10, batch_size=8)
    ref = train_lm(cfg)[1]
    with pytest.raises(RuntimeError, match="simulated crash"): train_lm(cfg, callbacks=[_Crash(25)], run_dir=tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    _, hist, trainer = train_lm(cfg, run_dir=tmp_path)
    assert [r["step"] for r in hist.val] == [r["step"] for r in ref.val]
    assert hist.val[-1]["val/bpb"] == pytest.approx(ref.val[-1]["val/bpb"], abs=1e-6)
    assert [r["train/loss"] for r in hist.train] == pytest.approx([r["train/loss"] for r in ref.train], abs=1e-5)
    assert hist.train[-1]["tokens"] == cfg.tokens
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "resumed-1" / "metrics.csv").is_file()  # both segments' logs kept
    assert not (tmp_path / "checkpoints").exists()  # deleted once the fit completed


def test_resumable_loader_replays_epochs_and_batches():
    make = lambda: torch.utils.data.DataLoader(range(12), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5))
    ref = ResumableLoader(make()); order = [b.tolist() for _ in range(3) for b in ref]
    for epochs, batches in [(0, 0), (0, 2), (1, 0), (2, 3)]:
        r = ResumableLoader(make()); r.resume_at(epochs, batches)
        assert [b.tolist() for b in r] == order[4 * epochs + batches: 4 * (epochs + 1)]
    with pytest.raises(ValueError, match="epochs"): ResumableLoader(make()).resume_at(-1, 0)


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
