"""kairoi-trio: a time-based job scheduler server on Trio."""

# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic]). A constant, not importlib.metadata.version(): that
# lookup (and importing importlib.metadata) cost ~60 ms of every server and
# command-line start.
__version__ = "0.1.0"
