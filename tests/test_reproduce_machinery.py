"""The reproduce machinery: README names importable from trainlab.reproduce and trainlab.readme in either import order,
reproductions discovered from the package's sources, the fast decision made once, and the README table's verdicts."""
import re, subprocess, sys
from pathlib import Path
import pytest

import trainlab
from trainlab.core import read_json, write_json
from trainlab.reproduce import (REPRODUCTIONS, available_reproductions, register_reproduction, reproduce, reproduction_modules)
from trainlab.stats import Claim

PKG = Path(trainlab.__file__).resolve().parent


@pytest.mark.parametrize("first, second", [("trainlab.readme", "trainlab.reproduce"), ("trainlab.reproduce", "trainlab.readme")])
def test_readme_names_import_in_either_order(first, second):
    code = (f"import {first}, {second}\n"
            "import trainlab.readme as rd, trainlab.reproduce as rp\n"
            "from trainlab.reproduce import SITE_URL, page_url, VERDICT_MARKS, verdict_mark, results_table, readme_text\n"
            "assert results_table is rd.results_table and readme_text is rd.readme_text and SITE_URL == rd.SITE_URL\n"
            "assert rp.REPRODUCTION_MODULES == rp.reproduction_modules()\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_unknown_names_still_raise_attribute_error():
    import trainlab.reproduce as rp
    with pytest.raises(AttributeError, match="no_such_name"): rp.no_such_name


def test_every_module_that_registers_a_reproduction_is_found():
    found = set(reproduction_modules())
    registers = {".".join(("trainlab", *p.relative_to(PKG).with_suffix("").parts))
                 for p in PKG.rglob("*.py") if re.search(r"^\s*@register_reproduction\(", p.read_text(), re.M)}
    assert registers and found == registers and "trainlab.baseline" in found
    for name, rep in available_reproductions().items():
        if rep.fn.__module__.startswith("trainlab."): assert rep.fn.__module__ in found, name


def test_a_new_module_is_found_without_a_list(tmp_path, monkeypatch):
    pkg = tmp_path / "extra_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text("from trainlab.reproduce import register_reproduction\n\n"
                                        "@register_reproduction('toy_discovered', 'found by the scan')\n"
                                        "def run(ctx): return {}\n")
    (pkg / "other.py").write_text("# mentions register_reproduction( but registers nothing\nX = 1\n")
    assert reproduction_modules(pkg, "extra_pkg") == ("extra_pkg.sub.mod",)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import importlib
        for m in reproduction_modules(pkg, "extra_pkg"): importlib.import_module(m)
        assert REPRODUCTIONS["toy_discovered"].description == "found by the scan"
    finally:
        REPRODUCTIONS.pop("toy_discovered", None)
        for m in [m for m in sys.modules if m.startswith("extra_pkg")]: del sys.modules[m]


@pytest.fixture
def seen():
    "A reproduction that records the context it was handed."
    got = {}
    @register_reproduction("toy_fast", "test double", default_seeds=3,
                           claims=[Claim("pos", "x is above 0.", "x", ("a",), "mean", ">", 0.0)])
    def _toy(ctx):
        got.update(fast=ctx.fast, seeds=list(ctx.seeds))
        return {"samples": {"a": {"x": [1.0 + 0.01 * s for s in ctx.seeds]}}}
    yield got
    del REPRODUCTIONS["toy_fast"]


def test_fast_is_decided_once_and_used_everywhere(tmp_path, monkeypatch, seen):
    monkeypatch.setenv("IN_TEST", "1")  # as under nbdev_test: every run is the fast one, even without fast=True
    r = reproduce("toy_fast", out=tmp_path)
    assert seen == {"fast": True, "seeds": [0]}  # ctx.fast, and the default seed count of a fast run
    assert r["run"]["fast"] is True and r["metrics"]["claims"][0]["verdict"] == "not tested (--fast)"
    assert read_json(tmp_path / "toy_fast" / "run.json")["command"].startswith("trainlab reproduce toy_fast --fast")
    monkeypatch.delenv("IN_TEST")
    r = reproduce("toy_fast", out=tmp_path)
    assert seen == {"fast": False, "seeds": [0, 1, 2]} and r["run"]["fast"] is False
    assert r["metrics"]["claims"][0]["verdict"] == "holds"


def test_run_config_is_kept_with_the_reproduction():
    from trainlab.runconfig import RunConfig
    rep = available_reproductions()["baseline"]
    assert rep.run_config is not None and issubclass(rep.run_config, RunConfig)


def test_results_table_shows_invalid_claims_in_bold(tmp_path):
    from trainlab.readme import results_table, verdict_mark
    @register_reproduction("toy_table", "test double", notebook="05_baseline.ipynb",
                           claims=[Claim("low", "The loss is below 1.", "loss", ("a",), "mean", "<", 1.0)])
    def _toy(ctx): return {}
    try:
        rec = REPRODUCTIONS["toy_table"].claims[0].judge({"a": {"loss": [0.5, float("nan"), 0.6]}}, seeds=[3, 4, 5])
        write_json(tmp_path / "toy_table" / "metrics.json", {"claims": [rec]})
        write_json(tmp_path / "toy_table" / "run.json", {"fast": False})
        row = next(l for l in results_table(tmp_path).splitlines() if "`toy_table`" in l)
    finally: del REPRODUCTIONS["toy_table"]
    assert "| 2 | **invalid** (seed 4: non-finite) |" in row
    assert verdict_mark("fails") == "**fails**" and verdict_mark("not tested (--fast)") == "not tested (--fast)"


def test_a_withdrawn_claim_shows_as_withdrawn_while_its_run_is_committed():
    "A claim found biased after its run is shown as withdrawn, with why, never as its recorded verdict; a rerun lifts it."
    from trainlab.reproduce import REPRODUCTIONS, register_reproduction, shown_verdict
    from trainlab.stats import Claim
    c = Claim("c", "x below 1", "x", ("a",), "mean", "<", 1.0)
    rec = {"name": "c", "verdict": "holds"}
    register_reproduction("_withdrawn_demo", claims=(c,), withdrawn={"c": ("abc123", "it was biased")})(lambda ctx: {})
    try:
        rep = REPRODUCTIONS["_withdrawn_demo"]
        assert shown_verdict(rep, rec, {"git_sha": "abc123def"}) == "**withdrawn**: it was biased"
        assert shown_verdict(rep, rec, {"git_sha": "fff000"}) == "holds"  # another (newer) run
    finally:
        del REPRODUCTIONS["_withdrawn_demo"]
    with pytest.raises(ValueError, match="withdrawn"):
        register_reproduction("_bad", claims=(c,), withdrawn={"nope": ("abc", "why")})
    # the committed ROCR run: its neighbour claim is withdrawn in the README
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines()
               if "`unlearning_rocr`" in line and "neighbour universe" in line)
    assert "**withdrawn**" in row and "| holds |" not in row
