"""alignloop: Llama 3-style post-training as resumable YAML recipes.

The public API is small and imports nothing heavy until it is used::

    import alignloop
    recipe = alignloop.load_recipe("recipes/quickstart.yaml", overrides=["sft.learning_rate=1e-4"])
    result = alignloop.run(recipe)
"""

from alignloop._version import __version__

__all__ = ["__version__", "load_recipe", "run", "run_stage"]


def __getattr__(name):
    if name == "load_recipe":
        from alignloop.config import load_recipe

        return load_recipe
    if name in ("run", "run_stage"):
        from alignloop.pipeline import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'alignloop' has no attribute {name!r}")
