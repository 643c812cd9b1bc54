"""The package's version, in a module of its own so that every layer can read it without
importing the package face (`optiscope/__init__.py` re-exports it)."""

__version__ = "0.1.0"
