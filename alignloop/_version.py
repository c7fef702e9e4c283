"""The package version (pyproject.toml's), in a module of its own so that anything can read it
without importing the package's public facade."""

__version__ = "0.1.0"
