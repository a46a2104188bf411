"""Runs that survive faults: resume after a kill, SIGTERM/SIGINT exit codes and messages, --out checked before training,
--threads oversubscription warned, strict JSON, staging folders reused or removed."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

from trainlab.cli import main
from trainlab.core import read_json, write_json
from trainlab.reproduce import REPRODUCTIONS, register_reproduction, reproduce, staging_dir
from trainlab.stats import Claim

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


def test_threads_above_the_cores_are_warned(tmp_path, capsys, toy):
    n = torch.get_num_threads()
    try: assert main(["reproduce", toy, "--fast", "--out", str(tmp_path), "--threads", str(os.cpu_count() * 50)]) == 0
    finally: torch.set_num_threads(n)
    assert "more than the" in capsys.readouterr().err


def test_metrics_are_strict_json_and_summaries_say_na(tmp_path, capsys, toy):
    assert main(["reproduce", toy, "--out", str(tmp_path)]) == 0
    text = (tmp_path / toy / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    m = json.loads(text)
    assert m["undefined"] is None and m["samples"]["b"]["loss"] == [None, None]
    claim = m["claims"][0]
    assert claim["estimate"] is None and claim["ci95"] == [None, None] and claim["n_seeds"] == 0 and claim["verdict"] == "inconclusive"
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
