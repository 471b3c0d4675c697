"""A recipe from YAML (a file, a packaged name, --set overrides) to a validated Recipe, and back."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from .recipe import PACKAGE_DIR, Recipe
from .schema import ConfigError, apply_override, build
from .storage import check_storage_path, resolve_run_path
from .validate import validate


def resolve_recipe_path(path: str) -> Path:
    """A path, or a recipe name shipped in configs/ (``tiny-cpu`` or ``tiny-cpu.yaml``)."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (PACKAGE_DIR / "configs" / path, PACKAGE_DIR / "configs" / f"{path}.yaml"):
        if cand.exists():
            return cand
    shipped = sorted(x.stem for x in (PACKAGE_DIR / "configs").glob("*.yaml"))
    raise ConfigError(f"recipe {path!r} not found: give a YAML path or one of {', '.join(shipped)}")


def joins_cluster(r: "Recipe") -> bool:
    """True when the run connects to an existing cluster (whose resources are checked on arrival)."""
    return r.ray.address is not None or "RAY_ADDRESS" in os.environ


def recipe_dict(path: str | None, overrides: list[str] = (), output_dir: str | None = None) -> dict:
    """The recipe file as a mapping, with ``--set`` overrides and ``--output-dir`` applied (unchecked)."""
    data: dict = {}
    if path:
        text = resolve_recipe_path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path}: the top level must be a mapping, got {type(data).__name__}")
    for o in overrides:
        apply_override(data, o)
    if output_dir is not None:
        data["output_dir"] = output_dir
    return data


def load_recipe(path: str | None, overrides: list[str] = (), output_dir: str | None = None,
                cpus: float | None = None, gpus: float | None = None, stage: str = "grpo") -> Recipe:
    """Load, override and validate. Resources are checked against ``cpus``/``gpus`` when given,
    else against this machine unless the recipe joins an existing cluster, for what ``stage``
    starts (see ``validate``)."""
    recipe = build(Recipe, recipe_dict(path, overrides, output_dir))
    check_storage_path(recipe.storage.path)
    recipe.output_dir = resolve_run_path(recipe.output_dir, recipe.storage.path)
    validate(recipe, cpus, gpus, resources=cpus is not None or gpus is not None or not joins_cluster(recipe),
             stage=stage)
    return recipe


def dump(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
