"""A full disk in the middle of a run: the checkpoint write fails with an OSError, the previous checkpoint stays intact,
the run is marked failed, and once there is room again --resume finishes it with the numbers of an uninterrupted run.
The disk is a small tmpfs, so this needs root on Linux; elsewhere it is skipped."""
import contextlib, os, subprocess, sys
from pathlib import Path
import pytest
import torch

from trainlab.core import read_json
from trainlab.data import LMDataModule
from trainlab.model import ModelConfig
from trainlab.reproduce import REPRODUCTIONS, register_reproduction, reproduce, staging_dir
from trainlab.train import TrainConfig, LMLitModule, fit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                reason="mounting a small tmpfs needs root on Linux")

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
CFG = TrainConfig(seq_len=32, batch_size=4, steps=8, warmup_steps=2, val_every=2, model=TINY)


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    "A tmpfs of `size` bytes mounted at `path` (skips the test where mounting is not allowed); unmounted afterwards."
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try: yield path
    finally: subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tiny_fit():
    """A reproduction with one unit: a tiny fit with a checkpoint after every second step (kept, to measure it)."""
    @register_reproduction("toy_disk", "test double")
    def _toy(ctx):
        def train(run_dir):
            data = LMDataModule(corpus="stdlib_prose", seq_len=32, batch_size=4, max_eval_tokens=2048, seed=0)
            _, hist, _ = fit(CFG, lambda: LMLitModule(TINY, **CFG.lit_kwargs()), data, run_dir=run_dir, keep_checkpoint=True)
            return {"val_bpb": hist.val[-1]["val/bpb"]}
        return ctx.unit("fp32/seed0", train)
    yield "toy_disk"
    del REPRODUCTIONS["toy_disk"]


def test_full_disk_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, tiny_fit):
    ref = reproduce(tiny_fit, out=tmp_path / "ref")
    ckpt = tmp_path / "ref" / tiny_fit / "logs" / "fp32" / "seed0" / "checkpoints" / "last.ckpt"
    size = ckpt.stat().st_size
    disk = tmp_path / "disk"
    with tmpfs(disk, int(1.5 * size) + 64 * 1024) as out:  # room for one checkpoint, not for a second beside it
        with pytest.raises(OSError) as e: reproduce(tiny_fit, out=out)
        assert e.value.errno == 28  # ENOSPC, as a plain OSError, not a torch RuntimeError
        st = staging_dir(out, tiny_fit)
        status = read_json(st / "status.json")
        assert status["state"] == "failed" and status["error"].startswith("OSError") and "No space left" in status["error"]
        kept = st / "logs" / "fp32" / "seed0" / "checkpoints"
        assert sorted(p.name for p in kept.iterdir()) == ["last.ckpt"]  # intact, and no temporary file left over
        assert torch.load(kept / "last.ckpt", weights_only=False)["global_step"] == 2
        r = subprocess.run(["mount", "-o", "remount,size=50m", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = reproduce(tiny_fit, out=out, resume=True)
        assert got["metrics"]["val_bpb"] == pytest.approx(ref["metrics"]["val_bpb"], abs=1e-6)
        assert (out / tiny_fit / "logs" / "fp32" / "seed0" / "resumed-1" / "metrics.csv").is_file()
        assert [s["outcome"] for s in got["run"]["sittings"]] == ["failed: OSError", "finished"]
