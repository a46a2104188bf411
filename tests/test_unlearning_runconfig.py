"""The unlearning reproductions follow the one run-config shape: presets, seeds, arms in the registry, claims on registered arms."""
import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainlab.model import ModelConfig, TinyLM
from trainlab.reproduce import available_reproductions
from trainlab.runconfig import arm_specs, arms_of, check_claim_arms, check_run_config
from trainlab.train import TrainConfig
from trainlab.unlearning import (
    ROCR_ARMS, ROCR_CLAIMS, ROCR_NEIGHBOUR_BUDGET, UNLEARN_ARMS, UNLEARN_CLAIMS, WORLD_MODELS, RocrRunConfig, SeedRun,
    UnlearnRunConfig, WorldEval, WorldRunConfig, batch_logits, distractors, finite_mean, form_scores, make_world,
    neighbour_accuracy, retain_passages, rocr_world, unlearn_run_config, world_model_config, world_tokenizer)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls", [UnlearnRunConfig, RocrRunConfig])
def test_run_configs_follow_the_contract(cls):
    assert issubclass(cls, WorldRunConfig) and cls.seed_field == "train.seed"
    check_run_config(cls)
    assert cls.preset(True, 7) == cls.fast(7) == cls.fast().with_seed(7)
    assert cls.full(3).train.seed == 3 and cls.full(3) == cls().with_seed(3)
    assert cls(train=dict(steps=60)).train.steps == 60
    with pytest.raises(TypeError, match="`train`"): cls(train=3)
    with pytest.raises(ValueError, match="`n_generic`"): cls(n_generic=4)
    with pytest.raises(ValueError, match="`seed`"): cls.fast().with_seed(-1)


def test_reproductions_register_their_run_configs():
    reps = available_reproductions()
    assert reps["unlearning"].run_config is UnlearnRunConfig and reps["unlearning_rocr"].run_config is RocrRunConfig
    assert unlearn_run_config(True, 2) == UnlearnRunConfig.fast(2)


def test_full_presets_keep_their_sizes():
    u, r = UnlearnRunConfig.full(), RocrRunConfig.full()
    assert (u.train.steps, u.train.model.d_model, u.train.model.n_layers, u.n_generic) == (800, 128, 4, 120)
    assert (r.train.steps, r.train.model.d_model, r.train.model.n_layers, r.n_generic, r.window) == (1500, 96, 8, 60, 3)
    assert [f.name for f in dataclasses.fields(RocrRunConfig)][:3] == ["train", "n_generic", "name_pieces"]


def test_seed_run_takes_its_seed_through_with_seed():
    cfg = UnlearnRunConfig.fast(0)
    s = SeedRun(cfg, 5)
    assert s.cfg == cfg.with_seed(5) and s.train.seed == 5 and s.train.model.vocab_size == s.tok.vocab_size


def test_arms_are_registered_in_table_order_with_honest_roles():
    specs = arm_specs("unlearning")
    assert list(specs)[:2] == ["orig", "retrain"] and {k: specs[k] for k in WORLD_MODELS} == WORLD_MODELS
    assert UNLEARN_ARMS == {k: v for k, v in specs.items() if k not in WORLD_MODELS}
    roles = {k: a.role for k, a in arms_of("unlearning").items()}
    assert roles["orig"] == "baseline" and roles["retrain"] == "control"
    assert roles["whp_full"] == roles["rocr"] == "method"
    assert all(roles[k] == "baseline" for k in ("grad_ascent", "graddiff", "graddiff_kl", "npo", "simnpo", "whp_inference"))
    assert all(roles[k] == "ablation" for k in ("whp_reinforced_only", "whp_anchors_only", "rocr_no_projection"))
    assert all(roles[k] == "exploratory" for k in ("whp_exact_anchors", "whp_full_alpha5", "grad_ascent_lr1e-4", "rocr_traced"))
    assert all(arms_of("unlearning")[k].name == k for k in specs)  # the lr sweep keeps its names with '-'
    assert list(arm_specs("unlearning_rocr")) == ["trace", *ROCR_ARMS]
    assert ROCR_ARMS == {"rocr_single_traced": ("single", "traced"), "rocr_single_late": ("single", "late"),
                         "rocr_batch_traced": ("batch", "traced")}


def test_claims_name_registered_non_exploratory_arms():
    assert check_claim_arms("unlearning", UNLEARN_CLAIMS) == UNLEARN_CLAIMS
    assert check_claim_arms("unlearning_rocr", ROCR_CLAIMS) == ROCR_CLAIMS
    kept = next(c for c in ROCR_CLAIMS if c.name == "rocr_neighbours_kept")
    assert kept.threshold == ROCR_NEIGHBOUR_BUDGET == RocrRunConfig.full().neighbour_budget == 0.05
    assert "less than 5 points" in kept.statement


def test_shared_helpers_are_public_and_agree():
    w = make_world(0, n_generic=24)
    tok = world_tokenizer(w)
    assert WorldEval(w, tok).retain_texts == retain_passages(w)
    assert finite_mean([1.0, None, float("nan"), 3.0]) == 2.0 and math.isnan(finite_mean([]))
    import random
    t = w.universes["target"]
    gold = t.facts[(t.people[0], "home")]
    d = distractors(random.Random(0), t, "home", gold, 2)
    assert len(d) == 2 and gold not in d
    torch.manual_seed(0)
    m = TinyLM(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2)).eval()
    ids = torch.randint(0, tok.vocab_size, (5, 7))
    torch.testing.assert_close(batch_logits(m, ids, chunk=2), m(ids).logits.float())


def test_neighbour_accuracy_is_the_mean_over_forms():
    cfg = RocrRunConfig.fast()
    w, tok = rocr_world(cfg, 0)
    torch.manual_seed(0)
    m = TinyLM(world_model_config(cfg.train.model, tok)).eval()
    per_form = [v["acc"] for v in form_scores(m, tok, w, "neighbour")["forms"].values()]
    assert neighbour_accuracy(m, tok, w) == float(np.mean(per_form))


def test_no_private_name_is_imported_across_unlearning_modules():
    for p in sorted((ROOT / "trainlab" / "unlearning").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (node.level or node.module.startswith("trainlab")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{p.name} imports {private} from {node.module}"


def test_modules_stay_under_400_lines():
    for p in sorted((ROOT / "trainlab" / "unlearning").glob("*.py")):
        assert len(p.read_text().splitlines()) <= 400, p.name
