"""kairoi-trio: a time-based job scheduler server on Trio."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kairoi-trio")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
