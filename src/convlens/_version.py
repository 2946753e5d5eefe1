"""The installed convlens version (one place, imported by the modules that record it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("convlens")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
