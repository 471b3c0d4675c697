"""Recipes built from the shipped tiny ones, for the tests."""
import yaml


def staged(tmp_path, tiny_world, stages, **base):
    """configs/tiny-staged.yaml with these ``stages`` (and top-level keys ``base``), on the
    session's tiny world, without the dashboard; written to ``tmp_path``, its path returned."""
    recipe = yaml.safe_load(open("configs/tiny-staged.yaml"))
    recipe["stages"] = stages
    recipe["model"]["tiny_dir"] = str(tiny_world)
    recipe["ray"]["dashboard"] = False
    recipe.update(base)
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
