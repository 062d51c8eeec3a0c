"""The package's version, below every module that records it (``skanomaly.__version__``)."""

__version__ = "0.1.0.dev0"
