from pathlib import Path

import pytest

from manidp_cli.config import Recipe, load_recipe
from manidp_cli.errors import RecipeError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    assert isinstance(load_recipe(path), Recipe)


def test_default_recipe_file_matches_built_in_defaults():
    assert load_recipe(RECIPES / "default.yaml") == load_recipe(None) == Recipe()


def test_default_and_paper_recipes_differ_where_documented():
    default, paper = load_recipe(RECIPES / "default.yaml"), load_recipe(RECIPES / "paper.yaml")
    assert (default.gates.init, default.gates.reduction, default.schedule.feedback_every) == ("l1_norm", 8, 1)
    assert (paper.gates.init, paper.gates.reduction, paper.schedule.mode) == ("ones", None, "epoch")
    assert (paper.loss.lambda_sparse, paper.loss.lambda_sim, paper.loss.distill_weight) == (0.1, 0.1, 0.0)


def test_a_section_given_in_part_keeps_the_recipe_defaults_of_its_other_keys():
    # the built-in gates differ from GatePolicy's own (l1_norm start, fc1 width C/8): one dotted
    # override without a recipe file once reset them to the paper's all-ones start and width rule
    recipe = load_recipe(None, overrides={"gates": {"depthwise": "skip"}})
    assert (recipe.gates.depthwise, recipe.gates.init, recipe.gates.reduction) == ("skip", "l1_norm", 8)
    assert load_recipe(None, overrides={"gates": {"reduction": None}}).gates.reduction is None
    with pytest.raises(RecipeError, match="unknown key 'gates.depth'"):
        load_recipe(None, overrides={"gates": {"depth": "skip"}})


def test_paper_settings():
    cifar = load_recipe(RECIPES / "resnet56-cifar10.yaml")
    assert (cifar.loss.lambda_sparse, cifar.loss.lambda_sim) == (5e-3, 1.0)
    assert (cifar.optimizer.lr, cifar.batch_size, cifar.optimizer.nesterov) == (0.05, 128, True)
    assert cifar.optimizer.weight_decay == 5e-4 and cifar.optimizer.gate_weight_decay == 0.0
    assert (cifar.loss.kappa, cifar.loss.gamma) == (0.5, 1.0)


def test_extends_merges_nested_sections_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 7\noptimizer:\n  lr: 0.2\n  momentum: 0.8\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptimizer:\n  lr: 0.3\n")
    recipe = load_recipe(tmp_path / "child.yaml", overrides={"epochs": 2, "seed": None})
    assert (recipe.epochs, recipe.optimizer.lr, recipe.optimizer.momentum, recipe.seed) == (2, 0.3, 0.8, 0)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("loss:\n  lamda_sim: 1.0\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: unknown key 'loss.lamda_sim'"):
        load_recipe(path)


def test_bad_values_and_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_flops: 1.5\n")
    with pytest.raises(RecipeError, match="'target_flops': Input should be less than 1"):
        load_recipe(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(listing)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe(loop)


def test_yaml_round_trip():
    recipe = load_recipe(RECIPES / "resnet34-imagenet.yaml")
    import yaml

    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe


def test_input_gates_with_a_codebook_is_a_clear_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("epochs: 3\nschedule:\n  hold_epochs: 2\ngates:\n  inputs: true\ncodebook:\n  entries: 4\n")
    with pytest.raises(RecipeError, match=r"codebook.entries \(4\) needs gates.inputs: false"):
        load_recipe(path)


def test_dotted_overrides_reach_any_key_and_named_flags_win():
    from manidp_cli.config import with_dotted_overrides

    overrides = with_dotted_overrides(
        {"epochs": 2, "optimizer": {"lr": 0.2}, "seed": None},
        ["loss.lambda_sim=0.2", "gates.exclude=[layer4.*]", "optimizer.lr=0.5", "optimizer.nesterov=false"],
    )
    recipe = load_recipe(None, overrides)
    assert recipe.loss.lambda_sim == 0.2 and recipe.gates.exclude == ("layer4.*",)
    assert recipe.optimizer.lr == 0.2 and recipe.optimizer.nesterov is False and recipe.epochs == 2
    with pytest.raises(RecipeError, match=r"-o 'lambda_sim': expected KEY=VALUE"):
        with_dotted_overrides({}, ["lambda_sim"])
    with pytest.raises(RecipeError, match=r"unknown key 'loss.lamda_sim'"):
        load_recipe(None, with_dotted_overrides({}, ["loss.lamda_sim=1"]))


def test_hybrid_distill_recipe_is_hybrid_with_a_quarter_static_and_both_distillations():
    # docs/results.md measures it as the benchmark arm hybrid_recipe_s025_fkd: hybrid.yaml with these changes
    changes = {"static_share": 0.25, "loss": {"distill_weight": 1.0, "feature_distill_weight": 5.0}}
    recipe = load_recipe(RECIPES / "hybrid-distill.yaml")
    assert recipe == load_recipe(RECIPES / "hybrid.yaml", overrides=changes)
    assert (recipe.loss.lambda_sparse, recipe.loss.lambda_sim, recipe.narrow_training) == (0.0, 0.0, True)
