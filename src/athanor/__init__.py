"""athanor: the whole life of a language model in one small, runnable project."""

__version__ = "0.1.0"
