"""Every shipped example recipe parses and validates against the registered configs."""

from pathlib import Path

import pytest

from edgeslim.recipe import load_recipe

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.steps, path.name
    for step in recipe.steps:
        assert type(step).from_dict({k: v for k, v in step.to_dict().items() if k != "technique"}) == step
