from pathlib import Path

import pytest

from athanor.config import load_recipe
from athanor.errors import AthanorError
from athanor.train.pretrain import PretrainRecipe


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  lr: 0.01\n  max_steps: 7\nmodel:\n  hidden_size: 512\n")
    r = load_recipe(PretrainRecipe, f, ["--train.max_steps=9", "--data.paths=a.txt,b.txt", "--tokenizer_path=none"])
    assert r.train.lr == 0.01 and r.train.max_steps == 9 and r.model.hidden_size == 512
    assert r.data.paths == ["a.txt", "b.txt"] and r.tokenizer_path is None
    assert r.model.num_hidden_layers == PretrainRecipe().model.num_hidden_layers
    # YAML's flow style for a list reads the same as commas
    assert load_recipe(PretrainRecipe, None, ["--data.paths=[a.txt, b.txt]"]).data.paths == ["a.txt", "b.txt"]


def test_scientific_notation_and_bools() -> None:
    r = load_recipe(PretrainRecipe, None, ["--train.lr=3e-4", "--train.compile=true", "--train.max_steps=1e3"])
    assert r.train.lr == pytest.approx(3e-4) and r.train.compile is True and r.train.max_steps == 1000


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(AthanorError, match=r"bad\.yaml.*train\.learning_rate"):
        load_recipe(PretrainRecipe, f, [])


def test_unknown_override_and_bad_values() -> None:
    with pytest.raises(AthanorError, match="train.lrr"):
        load_recipe(PretrainRecipe, None, ["--train.lrr=1"])
    with pytest.raises(AthanorError, match="must be int"):
        load_recipe(PretrainRecipe, None, ["--train.max_steps=lots"])
    with pytest.raises(AthanorError, match="one of"):
        load_recipe(PretrainRecipe, None, ["--train.schedule=linear"])


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  lr: [1,\n")
    with pytest.raises(AthanorError, match=r"broken\.yaml:\d+"):
        load_recipe(PretrainRecipe, f, [])


def test_recipes_in_repo_are_valid() -> None:
    """Each shipped recipe loads as the recipe of its command (named after it), the rest as pre-training's."""
    from athanor.speedrun import SpeedrunRecipe
    from athanor.train.dpo import DPORecipe
    from athanor.train.facts_stage import FactsRecipe
    from athanor.train.grpo import GRPORecipe
    from athanor.train.ppo import PPORecipe
    from athanor.train.rm import RMRecipe

    commands = {"speedrun": SpeedrunRecipe, "dpo": DPORecipe, "rm": RMRecipe, "ppo": PPORecipe, "rlvr": GRPORecipe,
                "reward-hack": GRPORecipe, "rag-facts": FactsRecipe}
    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert {f.stem for f in recipes} >= set(commands)
    for f in recipes:
        load_recipe(commands.get(f.stem, PretrainRecipe), f, [])
