"""Imports every built-in pass so that each registers its name."""

from . import cleanup, fold_bn, fuse  # noqa: F401
