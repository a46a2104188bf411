"""Runs that survive faults and fail loudly: resume after a kill, SIGTERM/SIGINT exit codes and messages, --out checked
before training, --threads capped, strict JSON, staging folders reused or removed; divergence stops a run (exit 1), argument
limits, one run per result folder (a lock), damaged checkpoints skipped, failures recorded even when the record cannot be
written, sittings of a resumed run, one-line errors (exit 2) for everything that is the caller's to fix."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

from trainlab.cli import main
from trainlab.core import read_json, write_json, available_cores
from trainlab.data import LMDataModule
from trainlab.faults import DivergenceError, prev_checkpoint
from trainlab.model import ModelConfig
from trainlab.reproduce import REPRODUCTIONS, register_reproduction, reproduce, staging_dir, lock_path, MAX_SEEDS
from trainlab.stats import Claim
from trainlab.train import TrainConfig, LMLitModule, fit
import lightning as L

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CMD = [sys.executable, "-c", "import sys; from trainlab.cli import main; sys.exit(main())"]


def _trainlab(*args, **kw):
    return subprocess.Popen([*CMD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kw)


def _wait_for(path: Path, proc, timeout=240):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()}"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def toy():
    """A reproduction with two paired arms that trains nothing (fast to run in-process)."""
    @register_reproduction("toy_faults", "test double", default_seeds=2,
                           claims=[Claim("b_lower", "b is lower than a.", "loss", ("b", "a"), "diff", "<", 0.0)])
    def _toy(ctx):
        samples = {"a": {"loss": []}, "b": {"loss": []}}
        for s in ctx.seeds:
            samples["a"]["loss"].append(ctx.unit(f"a/seed{s}", lambda d: {"loss": 2.0 + s})["loss"])
            samples["b"]["loss"].append(ctx.unit(f"b/seed{s}", lambda d: {"loss": float("nan")})["loss"])
        return {"samples": samples, "undefined": float("inf")}
    yield "toy_faults"
    del REPRODUCTIONS["toy_faults"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL in the middle of the third unit; --resume reuses the two finished units, continues the third from its
    checkpoint, and ends with exactly the metrics of an uninterrupted run."""
    args = ["reproduce", "baseline", "--fast", "--seeds", "2", "--threads", "1", "--no-progress"]
    ref = subprocess.run([*CMD, *args, "--out", str(tmp_path / "ref")], capture_output=True, text=True, env=ENV, timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    p = _trainlab(*args, "--out", str(out))
    _wait_for(staging_dir(out, "baseline") / "logs" / "fp32" / "seed1" / "checkpoints" / "last.ckpt", p)
    p.kill(); p.wait()
    st = staging_dir(out, "baseline")
    assert read_json(st / "status.json")["state"] == "running" and not (out / "baseline").exists()  # killed: no result
    r = subprocess.run([*CMD, *args, "--out", str(out), "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    for unit in ("fp32/seed0", "bf16/seed0"): assert f"{unit}: finished before the restart" in r.stderr
    assert "fp32/seed1: finished before" not in r.stderr
    assert (out / "baseline" / "logs" / "fp32" / "seed1" / "resumed-1" / "metrics.csv").is_file()  # continued from its checkpoint
    got, want = read_json(out / "baseline" / "metrics.json"), read_json(tmp_path / "ref" / "baseline" / "metrics.json")
    for arm in ("fp32", "bf16"):
        assert got["samples"][arm]["val_bpb"] == pytest.approx(want["samples"][arm]["val_bpb"], abs=1e-6)
    assert [c["estimate"] for c in got["claims"] if c["metric"] == "val_bpb"] == pytest.approx(
        [c["estimate"] for c in want["claims"] if c["metric"] == "val_bpb"], abs=1e-6)
    assert not st.exists() and read_json(out / "baseline" / "run.json")["resumed"] is True
    run = read_json(out / "baseline" / "run.json")  # two sittings: the killed one (its end estimated) and the resumed one
    assert [x["outcome"].split(" ")[0] for x in run["sittings"]] == ["killed", "finished"]
    assert run["wall_s"] == pytest.approx(sum(x["wall_s"] for x in run["sittings"]), abs=0.01)


@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")])
def test_signals_exit_nonzero_and_keep_the_run_for_resume(tmp_path, sig, code, message):
    p = _trainlab("reproduce", "baseline", "--fast", "--threads", "1", "--no-progress", "--out", str(tmp_path))
    _wait_for(staging_dir(tmp_path, "baseline") / "logs" / "fp32" / "seed0" / "metrics.csv", p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert message in err and "--resume" in err
    status = read_json(staging_dir(tmp_path, "baseline") / "status.json")
    assert status["state"] == "failed" and status["error"].startswith(("Terminated", "Interrupted"))
    assert not (tmp_path / "baseline").exists()


def test_bad_out_is_rejected_before_training(tmp_path, capsys, toy):
    f = tmp_path / "a_file"; f.write_text("keep me")
    with pytest.raises(SystemExit) as e: main(["reproduce", toy, "--out", str(f)])
    assert e.value.code == 2 and "`out`: expected a folder" in capsys.readouterr().err
    (tmp_path / "res").mkdir(); (tmp_path / "res" / toy).write_text("not a folder")
    with pytest.raises(SystemExit) as e: main(["reproduce", toy, "--out", str(tmp_path / "res")])
    assert e.value.code == 2 and "never replaced silently" in capsys.readouterr().err
    assert (tmp_path / "res" / toy).read_text() == "not a folder" and f.read_text() == "keep me"
    if sys.platform.startswith("linux"):  # not writable even for root
        with pytest.raises(SystemExit) as e: main(["reproduce", toy, "--out", "/proc/self"])
        assert e.value.code == 2 and "`out`: expected a writable folder" in capsys.readouterr().err


def test_threads_above_the_cores_are_capped_and_warned(tmp_path, capsys, toy):
    n = torch.get_num_threads()
    try:
        assert main(["reproduce", toy, "--fast", "--out", str(tmp_path), "--threads", str(os.cpu_count() * 50)]) == 0
        assert torch.get_num_threads() == available_cores()  # never hundreds of threads
    finally: torch.set_num_threads(n)
    err = capsys.readouterr().err
    assert "more than the" in err and f"using {available_cores()}" in err


def test_metrics_are_strict_json_and_summaries_say_na(tmp_path, capsys, toy):
    assert main(["reproduce", toy, "--out", str(tmp_path)]) == 0
    text = (tmp_path / toy / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    m = json.loads(text)
    assert m["undefined"] is None and m["samples"]["b"]["loss"] == [None, None]
    claim = m["claims"][0]  # no finite seed: the claim is invalid, not silently judged on nothing
    assert claim["estimate"] is None and claim["ci95"] == [None, None] and claim["n_seeds"] == 0
    assert claim["verdict"] == "invalid (seeds 0, 1: non-finite)" and claim["nonfinite"] == {"rule": "invalid", "seeds": [0, 1]}
    assert "b_lower: n/a (n=0" in capsys.readouterr().out


def test_leftover_staging_is_removed_or_reused(tmp_path, toy):
    st = staging_dir(tmp_path, toy)
    write_json(st / "key.json", {"name": toy, "fast": False, "seeds": [0, 1]})
    write_json(st / ".units" / "a" / "seed0.json", {"loss": 99.0})  # a finished unit of a killed run
    (tmp_path / f".{toy}.staging-12345").mkdir()                     # an older per-pid staging folder
    r = reproduce(toy, out=tmp_path, resume=True)
    assert r["metrics"]["samples"]["a"]["loss"] == [99.0, 3.0]        # reused
    write_json(st / "key.json", {"name": toy, "fast": False, "seeds": [0, 1]})
    write_json(st / ".units" / "a" / "seed0.json", {"loss": 99.0})
    assert reproduce(toy, out=tmp_path)["metrics"]["samples"]["a"]["loss"] == [2.0, 3.0]  # without --resume: removed, rerun
    assert sorted(p.name for p in tmp_path.iterdir()) == [toy]
    write_json(st / "key.json", {"name": toy, "fast": True, "seeds": [0]})
    with pytest.raises(ValueError, match="same run"): reproduce(toy, out=tmp_path, resume=True)  # a different run: refused


# ---- tiny training runs for the guards and checkpoints
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
TINY_CFG = TrainConfig(seq_len=32, batch_size=4, steps=8, warmup_steps=2, val_every=2, model=TINY)


def _data(cfg=TINY_CFG):
    return LMDataModule(corpus="stdlib_prose", seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_eval_tokens=2048, seed=cfg.seed)


class NaNAfter(LMLitModule):
    "The loss turns NaN from step 3 on."
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 3 else loss


class HugeBpb(LMLitModule):
    "Reports a validation bpb of 20, and no uniform bpb of its own (the guard then takes 8 bits, uniform bytes)."
    def on_validation_epoch_end(self):
        self.log_dict({"val/loss": 14.0, "val/bpb": 20.0})


def test_divergence_stops_fit_naming_unit_step_and_value(tmp_path):
    run_dir = tmp_path / "fp32" / "seed0"
    with pytest.raises(DivergenceError) as e:
        fit(TINY_CFG, lambda: NaNAfter(TINY, **TINY_CFG.lit_kwargs()), _data(), run_dir=run_dir)
    err = e.value
    assert (err.unit, err.step, err.metric) == ("fp32/seed0", 4, "train/loss") and err.value != err.value  # NaN
    assert str(err).startswith("fp32/seed0: training diverged at step 4: train/loss = nan")
    assert isinstance(err, ValueError)
    ckpt = run_dir / "checkpoints" / "last.ckpt"  # the last good state (step 2) is kept for --resume, never a NaN one
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2


def test_divergence_at_a_val_bpb_above_one_and_a_half_uniform():
    with pytest.raises(DivergenceError, match=r"val/bpb = 20 is above 12, 1.5x the bpb of uniform predictions") as e:
        fit(TINY_CFG, lambda: HugeBpb(TINY, **TINY_CFG.lit_kwargs()), _data(), name="lr_sweep/top")
    assert e.value.unit == "lr_sweep/top" and e.value.step == 2 and e.value.limit == 12.0
    lit, hist, _ = fit(TINY_CFG.replace(steps=2), lambda: LMLitModule(TINY, **TINY_CFG.lit_kwargs()), _data())
    assert 8.0 < lit.val_uniform_bpb < 8.5  # log2(258) bits a byte token (EOT tokens carry no bytes)
    assert hist.val[-1]["val/bpb"] < 1.5 * lit.val_uniform_bpb


@pytest.fixture
def diverging():
    """A reproduction whose second unit diverges."""
    def diverge(run_dir): raise DivergenceError("bad/seed0", 7, "train/loss", float("inf"))  # as fit raises it
    @register_reproduction("toy_diverges", "test double")
    def _toy(ctx):
        ctx.unit("ok/seed0", lambda d: {"loss": 1.0})
        ctx.unit("bad/seed0", diverge)
        return {}
    yield "toy_diverges"
    del REPRODUCTIONS["toy_diverges"]


def test_cli_divergence_exits_1_in_one_line_and_marks_the_run_failed(tmp_path, capsys, diverging):
    assert main(["reproduce", diverging, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"trainlab: error: {diverging}: bad/seed0: training diverged at step 7: train/loss = inf")
    assert "marked failed" in err[-1] and "--resume" in err[-1] and not any("Traceback" in x for x in err)
    status = read_json(staging_dir(tmp_path, diverging) / "status.json")
    assert status["state"] == "failed" and status["error"].startswith("DivergenceError") and "Traceback" in status["traceback"]
    assert (staging_dir(tmp_path, diverging) / ".units" / "ok" / "seed0.json").is_file()  # the finished unit is kept
    assert not lock_path(tmp_path, diverging).exists()


# ---- argument limits, checked before anything is created
@pytest.mark.parametrize("args, msg", [
    (["--seeds", str(MAX_SEEDS + 1)], f"expected at most {MAX_SEEDS} seeds, got {MAX_SEEDS + 1}"),
    (["--seed", str(2**32 - 1), "--seeds", "2"], "seed + 2 - 1, is below 2**32"),
    (["--seed", str(2**32 - 1)], "seed + 2 - 1, is below 2**32"),  # the reproduction's default count (2) counts too
])
def test_seed_ranges_are_checked_up_front(tmp_path, capsys, toy, args, msg):
    with pytest.raises(SystemExit) as e: main(["reproduce", toy, "--out", str(tmp_path / "new"), *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # refused before the results folder was made


def test_reproduce_checks_seeds_itself(tmp_path, toy):
    with pytest.raises(ValueError, match="seeds"): reproduce(toy, out=tmp_path, seeds=MAX_SEEDS + 1)
    with pytest.raises(ValueError, match="seed"): reproduce(toy, out=tmp_path, seed=2**32 - 1)  # 2 seeds by default
    with pytest.raises(ValueError, match="seed"): reproduce(toy, out=tmp_path, seed=True)
    assert list(tmp_path.iterdir()) == []


def test_empty_and_too_long_out_are_refused(tmp_path, capsys, toy):
    with pytest.raises(SystemExit) as e: main(["reproduce", toy, "--out", ""])
    assert e.value.code == 2 and "`out`: expected a folder path, not an empty one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(["reproduce", toy, "--out", str(tmp_path / ("n" * 300))])
    assert e.value.code == 2 and "names of at most" in capsys.readouterr().err
    deep = tmp_path.joinpath(*["d" * 190] * 21)  # under PATH_MAX itself, but no room for what a run writes below it
    with pytest.raises(SystemExit) as e: main(["reproduce", toy, "--out", str(deep)])
    assert e.value.code == 2 and "a run writes up to" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- one run per result folder
_HOLD = """import sys
from trainlab.core import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_into_the_same_folder_fails_at_once_naming_the_holder(tmp_path, capsys, toy):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock_path(tmp_path, toy))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        write_json(staging_dir(tmp_path, toy) / "key.json", {"theirs": True})  # the other run's staging folder
        assert main(["reproduce", toy, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"another run (pid {holder.pid}) is writing '{toy}'" in err[0]
        assert read_json(staging_dir(tmp_path, toy) / "key.json") == {"theirs": True}  # left alone
    finally:
        holder.communicate("", timeout=60)
    assert not lock_path(tmp_path, toy).exists()
    assert main(["reproduce", toy, "--out", str(tmp_path)]) == 0  # free again once the holder is gone


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys, toy):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(tmp_path, toy).write_text(f"{dead.pid}\n")
    assert main(["reproduce", toy, "--out", str(tmp_path)]) == 0
    assert f"taking over the stale lock {lock_path(tmp_path, toy)} of pid {dead.pid}" in capsys.readouterr().err
    assert not lock_path(tmp_path, toy).exists()


# ---- checkpoints and status
class _Crash(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 5: raise RuntimeError("simulated crash")


def test_a_truncated_checkpoint_is_skipped_with_a_warning(tmp_path):
    mk = lambda: LMLitModule(TINY, **TINY_CFG.lit_kwargs())
    ref = fit(TINY_CFG, mk, _data())[1]
    with pytest.raises(RuntimeError, match="simulated crash"): fit(TINY_CFG, mk, _data(), callbacks=[_Crash()], run_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() and prev_checkpoint(last).is_file()  # steps 4 and 2
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # damaged
    with pytest.warns(UserWarning, match=r"skipping the unreadable checkpoint .*last\.ckpt.*resuming from the previous checkpoint"):
        _, hist, _ = fit(TINY_CFG, mk, _data(), run_dir=tmp_path)
    assert hist.val[-1]["val/bpb"] == pytest.approx(ref.val[-1]["val/bpb"], abs=1e-6)  # still exact, from step 2
    assert (tmp_path / "resumed-1" / "metrics.csv").is_file()


def test_unreadable_checkpoints_fall_back_to_the_start_of_the_unit(tmp_path):
    mk = lambda: LMLitModule(TINY, **TINY_CFG.lit_kwargs())
    with pytest.raises(RuntimeError, match="simulated crash"): fit(TINY_CFG, mk, _data(), callbacks=[_Crash()], run_dir=tmp_path)
    for f in (tmp_path / "checkpoints").iterdir(): f.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="resuming from the start of the unit"):
        _, hist, _ = fit(TINY_CFG, mk, _data(), run_dir=tmp_path)
    assert hist.train[-1]["tokens"] == TINY_CFG.tokens


def test_a_failure_that_cannot_be_recorded_does_not_hide_the_error(tmp_path, capsys, monkeypatch):
    import trainlab.reproduce as rp
    @register_reproduction("toy_full_disk", "test double")
    def _toy(ctx): raise RuntimeError("the original error")
    real = rp.write_json
    def full_disk(path, obj):
        if Path(path).name == "status.json" and obj.get("state") == "failed": raise OSError(28, "No space left on device")
        return real(path, obj)
    monkeypatch.setattr(rp, "write_json", full_disk)
    try:
        with pytest.raises(RuntimeError, match="the original error"): reproduce("toy_full_disk", out=tmp_path)
    finally: del REPRODUCTIONS["toy_full_disk"]
    assert "could not record the failure" in capsys.readouterr().err
    assert read_json(staging_dir(tmp_path, "toy_full_disk") / "sittings.json")[-1]["outcome"] == "failed: RuntimeError"


# ---- sittings
def test_run_json_records_every_sitting_and_their_total(tmp_path, monkeypatch):
    state = {"fail": True}
    @register_reproduction("toy_sittings", "test double")
    def _toy(ctx):
        ctx.unit("a/seed0", lambda d: {"x": 1.0})
        if state["fail"]: raise RuntimeError("first sitting fails")
        return {"x": 1.0}
    try:
        with pytest.raises(RuntimeError): reproduce("toy_sittings", out=tmp_path)
        st = staging_dir(tmp_path, "toy_sittings")
        sits = read_json(st / "sittings.json")
        sits.append({"started_at": "2024-01-01T00:00:00+00:00", "start_unix": time.time() - 50.0, "pid": 1})  # killed: no end
        write_json(st / "sittings.json", sits)
        state["fail"] = False
        run = reproduce("toy_sittings", out=tmp_path, resume=True)["run"]
    finally: del REPRODUCTIONS["toy_sittings"]
    outcomes = [s["outcome"] for s in run["sittings"]]
    assert outcomes[0] == "failed: RuntimeError" and outcomes[1].startswith("killed") and outcomes[2] == "finished"
    assert 0 <= run["sittings"][1]["wall_s"] <= 60  # up to the last file written before the next sitting
    assert run["wall_s"] == pytest.approx(sum(s["wall_s"] for s in run["sittings"]), abs=0.01)
    assert run["started_at"] == run["sittings"][0]["started_at"] and not (tmp_path / "toy_sittings" / "sittings.json").exists()


# ---- one line, no traceback, for everything that is the caller's to fix
def test_resume_of_a_different_run_is_one_line_exit_2(tmp_path):
    write_json(staging_dir(tmp_path, "baseline") / "key.json", {"name": "baseline", "fast": False, "seeds": [0]})
    r = subprocess.run([*CMD, "reproduce", "baseline", "--fast", "--resume", "--out", str(tmp_path)], capture_output=True,
                       text=True, env=ENV, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("trainlab: error: `resume`: expected the unfinished run") and "--resume" in lines[-1]


def test_every_preset_constructs():
    "The checks TrainConfig makes at construction accept every registered reproduction's presets."
    from trainlab.reproduce import available_reproductions
    for name, rep in available_reproductions().items():
        if rep.run_config is None: continue
        for make in (rep.run_config.full, rep.run_config.fast): make(0)
