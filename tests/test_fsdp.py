"""FSDP2 through `TrainConfig(strategy="fsdp2")`: two CPU processes over gloo train as one process
does on the same global batch.

Run as a script (`python tests/test_fsdp.py ARCH OUT`), this file is the training script of the
two-process run: Lightning's `ModelParallelStrategy` starts rank 1 by running the same command again.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from trainlab.model import ModelConfig, TinyLM
from trainlab.sharding import load_sharded_checkpoint
from trainlab.tokens import ByteTokenizer
from trainlab.train import LMLitModule, TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, STEPS, WORLD = 32, 4, 4, 2  # BATCH rows per process: the global batch is BATCH * WORLD


class FixedWindows(torch.utils.data.Dataset):
    "Byte windows of trainlab's own source, each row two documents (so document masks take part)."
    def __init__(self, n: int = 64, first: int = 0):
        text = (ROOT / "trainlab" / "model.py").read_bytes()[first * (SEQ + 1):(first + n) * (SEQ + 1)]
        self.x = torch.tensor(list(text), dtype=torch.long).view(n, SEQ + 1)
        self.cut = torch.randint(4, SEQ - 4, (n,), generator=torch.Generator().manual_seed(first))

    def __len__(self): return len(self.x)

    def __getitem__(self, i):
        doc = (torch.arange(SEQ) >= self.cut[i]).long()
        return dict(input_ids=self.x[i, :-1], labels=self.x[i, 1:], doc_ids=doc)


class FixedData(L.LightningDataModule):
    "The same global batches in order for any number of processes: rank r takes rows r, r + world..."
    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size, self.tokenizer = batch_size, ByteTokenizer()

    def loader(self, ds):
        t = self.trainer
        sampler = torch.utils.data.DistributedSampler(ds, t.world_size, t.global_rank,
                                                      shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self): return self.loader(FixedWindows())
    def val_dataloader(self): return self.loader(FixedWindows(n=8, first=64))


class Losses(L.Callback):
    def __init__(self): self.losses = []
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def build(arch: str):
    "The model to train, built after `fit` seeds: a TinyLM or a tiny Hugging Face Llama."
    if arch == "tinylm":
        return TinyLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ))
    from trainlab.hf import tiny_causal_lm
    return tiny_causal_lm("llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=1)


def train(arch: str, strategy: str, devices: int, batch_size: int, val_every: int = STEPS,
          callbacks: tuple = (), **fit_kwargs):
    cfg = TrainConfig(steps=STEPS, warmup_steps=0, schedule="constant", lr=5e-3,
                      batch_size=batch_size, seq_len=SEQ, strategy=strategy, devices=devices,
                      val_every=val_every)
    rec = Losses()
    lit, _, trainer = fit(cfg, lambda: LMLitModule(build(arch), **cfg.lit_kwargs()),
                          FixedData(batch_size), callbacks=[rec, *callbacks], accelerator="cpu",
                          use_distributed_sampler=False, **fit_kwargs)
    return lit, trainer, rec.losses


class StopAt(L.Callback):
    "Stops the fit after the validation at `step` (every rank), as a job that ends its sitting would."
    def __init__(self, step: int): self.step = step
    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step == self.step: trainer.should_stop = True


def resume_main(arch: str, out: str):
    "Both ranks: an uninterrupted sharded run, and one stopped after step 2 and resumed from its checkpoint."
    out = Path(out)
    _, whole, _ = train(arch, "fsdp2", WORLD, BATCH, val_every=2)
    whole.save_checkpoint(out / "whole.ckpt")
    _, first, _ = train(arch, "fsdp2", WORLD, BATCH, val_every=2, callbacks=(StopAt(2),),
                        run_dir=out / "run", keep_checkpoint=True)
    assert first.global_step == 2
    _, second, losses = train(arch, "fsdp2", WORLD, BATCH, val_every=2, run_dir=out / "run",
                              keep_checkpoint=True)
    second.save_checkpoint(out / "resumed.ckpt")
    if second.global_rank == 0:
        (out / "resumed.json").write_text(json.dumps(dict(steps=second.global_step, losses=losses)))


def main(arch: str, out: str):
    "The two-process run (both ranks run this): per-rank losses, a full and a sharded checkpoint."
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    lit, trainer, losses = train(arch, "fsdp2", WORLD, BATCH, run_dir=Path(out) / "run",
                                 keep_checkpoint=True)
    trainer.save_checkpoint(Path(out) / "final.ckpt")  # every rank takes part, rank 0 writes
    # the same weights as a folder of shards, one file per rank
    dcp.save({"state_dict": get_model_state_dict(lit)}, checkpoint_id=Path(out) / "sharded")
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(dict(losses=losses, val=val)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tinylm", "llama"])
def test_fsdp2_on_two_processes_matches_one_process(arch, tmp_path):
    if arch == "llama":
        pytest.importorskip("transformers", reason="the Llama arm needs transformers")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), arch, str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(WORLD)]
    # equal token counts per rank: the mean of the ranks' means is the global mean
    sharded_loss = torch.tensor([r["losses"] for r in ranks]).mean(0)

    lit, trainer, single = train(arch, "auto", 1, BATCH * WORLD)  # one process, the same batches
    # validation sums are reduced over the ranks: every rank reports the global numbers
    for r in ranks:
        for k in ("val/loss", "val/bpb"):
            assert r["val"][k] == pytest.approx(float(trainer.callback_metrics[k]), rel=1e-5), k
    loss_diff = (sharded_loss - torch.tensor(single)).abs().max().item()
    assert len(single) == STEPS and single[-1] < single[0]
    torch.testing.assert_close(sharded_loss, torch.tensor(single), rtol=1e-5, atol=1e-6)

    ckpt = torch.load(tmp_path / "final.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    # fit's own checkpoint of the run (run_dir) is one ordinary file with the same weights
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert last["global_step"] == STEPS and (tmp_path / "run" / "metrics.csv").is_file()
    for k, v in last["state_dict"].items():
        torch.testing.assert_close(v, ckpt["state_dict"][k], rtol=0, atol=0, msg=k)
    ref = lit.state_dict()
    assert set(ckpt["state_dict"]) == set(ref)
    w_diff = max((ckpt["state_dict"][k] - v).abs().max().item() for k, v in ref.items())
    # Adam divides each update by sqrt(v): an entry whose gradient is near 0 turns a 1e-7 difference
    # in the reduction order into a larger step difference, so the weights get an absolute
    # tolerance (the largest possible change is lr * steps = 2e-2)
    for k, v in ref.items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=1e-5, atol=1e-5, msg=k)
    print(f"\n{arch}: max |loss diff| {loss_diff:.2e}, max |weight diff| {w_diff:.2e}")

    # the folder of shards reads back whole in this (single) process, without a process group
    assert len(list((tmp_path / "sharded").glob("*.distcp"))) == WORLD
    shards = load_sharded_checkpoint(tmp_path / "sharded")["state_dict"]
    assert set(shards) == set(ref)
    for k, v in shards.items():
        torch.testing.assert_close(v, ckpt["state_dict"][k], rtol=0, atol=0, msg=k)

    # the sharded run's checkpoint loads into a plain single-process module and gives the same loss
    fresh = LMLitModule(build(arch))
    fresh.load_state_dict(ckpt["state_dict"])
    batch = FixedWindows()[0]
    x, y, d = (batch[k][None] for k in ("input_ids", "labels", "doc_ids"))
    with torch.no_grad():
        loss = fresh.model(x, labels=y, doc_ids=d).loss
        torch.testing.assert_close(loss, lit.model(x, labels=y, doc_ids=d).loss)


def test_trainconfig_strategy_is_checked():
    with pytest.raises(ValueError, match="`strategy`"):
        TrainConfig(strategy="fsdp")
    with pytest.raises(ValueError, match="`devices`"):
        TrainConfig(devices=0)
    assert TrainConfig(strategy="fsdp2", devices=2).replace(devices=4).devices == 4


@pytest.mark.slow
def test_a_sharded_run_resumes_to_the_uninterrupted_weights(tmp_path):
    "Stopped after step 2 and resumed from its own checkpoint, a 2-process FSDP2 run ends where the uninterrupted one does."
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "tinylm", str(tmp_path), "resume"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads((tmp_path / "resumed.json").read_text())
    assert info["steps"] == STEPS and len(info["losses"]) == STEPS - 2  # only the steps left ran
    whole, resumed = (torch.load(tmp_path / f, map_location="cpu", weights_only=False)
                      for f in ("whole.ckpt", "resumed.ckpt"))
    assert whole["global_step"] == resumed["global_step"] == STEPS
    assert (tmp_path / "run" / "resumed-1" / "metrics.csv").is_file()  # the second sitting's log
    for k, v in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)


if __name__ == "__main__":
    if sys.argv[3:] == ["resume"]:
        resume_main(*sys.argv[1:3])
    else:
        main(*sys.argv[1:])
