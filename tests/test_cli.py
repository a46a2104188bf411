import json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch

from trainlab.cli import main
from trainlab.reproduce import available_reproductions

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_baseline_fast_writes_complete_results(tmp_path, capsys):
    threads = torch.get_num_threads()
    try: assert main(["reproduce", "baseline", "--fast", "--out", str(tmp_path), "--seed", "3", "--threads", "1", "--no-progress"]) == 0
    finally: torch.set_num_threads(threads)
    out = tmp_path / "baseline"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "run.json", "loss_curve.png", "logs"}
    m, run = json.loads((out / "metrics.json").read_text()), json.loads((out / "run.json").read_text())
    for arm in ("fp32", "bf16"):
        assert 0 < m["samples"][arm]["val_bpb"][0] < 8 and m["samples"][arm]["tokens_per_s"][0] > 0
        assert (out / "logs" / arm / "seed3" / "metrics.csv").is_file()  # Lightning's CSV log of every arm x seed
    assert [c["name"] for c in m["claims"]] == ["stack_trains", "bf16_matches_fp32", "bf16_faster"]
    for c in m["claims"]:
        assert c["verdict"] == "not tested (--fast)" and c["n_seeds"] == 1
        assert set(c) >= {"name", "statement", "estimate", "ci95", "n_seeds", "threshold", "verdict"}
    assert run["config"]["threads"] == 1 and run["environment"]["torch_threads"] == 1  # --threads is honoured
    assert run["seeds"] == [3] and run["fast"] is True and run["command"].startswith("trainlab reproduce baseline")
    for k in ("git_sha", "config", "environment", "wall_s", "started_at"): assert k in run
    assert run["environment"]["versions"]["torch"]
    printed = capsys.readouterr().out
    assert printed.startswith("baseline: wall=") and str(out) in printed and "bf16_faster:" in printed and "not tested (--fast)" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_help_documents_seeds_and_resume(capsys):
    with pytest.raises(SystemExit): main(["reproduce", "--help"])
    text = capsys.readouterr().out
    assert "--seeds K" in text and "--resume" in text and "paired seeds" in text


@pytest.mark.parametrize("argv, msg", [
    (["reproduce", "nope"], "unknown reproduction 'nope'; choose from: all, " + ", ".join(available_reproductions())),
    (["reproduce", "baseline", "--seed", "x"], "expected an integer seed"),
    (["reproduce", "baseline", "--seed", "-1"], "expected a seed in"),
    (["reproduce", "baseline", "--threads", "0"], "expected a positive integer"),
    (["reproduce", "baseline", "--seeds", "0"], "expected a positive integer"),
    (["reproduce", "baseline", "--seeds", "1001"], "expected at most 1000 seeds, got 1001"),
    (["reproduce", "baseline", "--seed", str(2**32 - 1), "--seeds", "2"], "is below 2**32"),
    (["reproduce", "baseline", "--out", ""], "`out`: expected a folder path, not an empty one"),
    (["reproduce", "baseline", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_rejected_clearly(argv, msg, capsys):
    with pytest.raises(SystemExit) as e: main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err
    assert re.match(r"trainlab( reproduce)?: error: ", err.strip().splitlines()[-1])  # argparse's usage line, then one error line


def test_list_names_the_reproductions(capsys):
    assert main(["list"]) == 0
    assert "baseline" in capsys.readouterr().out and "baseline" in available_reproductions()


def test_console_script_is_installed():
    exe = shutil.which("trainlab")
    if exe is None: pytest.skip("package not installed with its console script (pip install -e .)")
    r = subprocess.run([exe, "reproduce", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "choose from: all, " + ", ".join(available_reproductions()) in r.stderr
