"""Every reproduction has the same shape: a RunConfig (full/fast presets, one way to set the seed), arms in the one
registry, the fast/test decision made in one place; and the site files agree with the registry."""
import re
from pathlib import Path

import pytest

from trainlab.reproduce import available_reproductions
from trainlab.runconfig import ARMS, RunConfig, check_claim_arms, check_run_config

ROOT = Path(__file__).resolve().parents[1]
REPS = available_reproductions()


@pytest.mark.parametrize("name", sorted(REPS))
def test_every_reproduction_uses_one_run_config_interface(name):
    rc = REPS[name].run_config
    assert rc is not None, f"{name}: register it with run_config=<its RunConfig subclass>"
    assert issubclass(rc, RunConfig)
    check_run_config(rc)
    assert rc.fast(5).with_seed(6) == rc.fast(6) and rc.full(5).run_seed == 5


@pytest.mark.parametrize("name", sorted(n for n, r in REPS.items() if r.claims))
def test_claims_compare_registered_arms(name):
    rep = REPS[name]
    tech = name if name in ARMS else Path(rep.notebook).parts[0]
    assert tech in ARMS, f"{name}: its arms are not registered (register_arm)"
    check_claim_arms(tech, rep.claims)


def test_the_fast_decision_is_made_in_one_place():
    "Only runconfig.is_fast_run (and core, which defines in_test) ask whether this is a test run."
    bad = []
    for p in sorted((ROOT / "trainlab").rglob("*.py")):
        if p.name in ("core.py", "runconfig.py", "_modidx.py"):
            continue
        bad += [f"{p.relative_to(ROOT)}:{i + 1}" for i, l in enumerate(p.read_text().splitlines())
                if re.search(r"\bin_test\(\)", l)]
    assert not bad, bad


def test_seed_setters_are_gone():
    "with_seed is the one way to change a seed: no seeded()/pair_pretrain-style setters on run configs."
    for name, rep in REPS.items():
        assert not hasattr(rep.run_config, "seeded"), name


def test_site_files_agree_with_the_registry():
    from trainlab.site import site_problems
    assert site_problems(ROOT) == []


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "trainlab").rglob("*.py")
            if p.name != "_modidx.py" and (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_private_name_imported_across_modules():
    import ast
    bad = []
    for p in sorted((ROOT / "trainlab").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("trainlab")):
                bad += [f"{p.relative_to(ROOT)}:{node.lineno}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def test_no_star_imports_and_no_references_outside_the_repository():
    for p in sorted((ROOT / "trainlab").rglob("*.py")):
        assert "import *" not in p.read_text(), p
    for p in [ROOT / "_quarto.yml", ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "kernels" / "README.md",
              *(ROOT / "nbs").rglob("*.ipynb"), *(ROOT / "nbs").glob("*.yml")]:
        if "results" in p.parts:
            continue
        assert "../shared" not in p.read_text() and "shared/TOOLCHAIN" not in p.read_text(), p
