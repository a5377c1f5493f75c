"""The package version, in one place: setup.py reads it, ``mate_ops.__version__`` imports it."""
__version__ = "0.1.0"
