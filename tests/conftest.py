"""Shared test set-up."""

from __future__ import annotations

import importlib
import sys

import cprfast

try:
    importlib.import_module("cprfast.channels")
except ModuleNotFoundError:
    # Until the channels branch is merged: use the contract stand-in (see the module).
    import _channels_standin  # tests/ is on sys.path (pytest rootdir conftest)

    sys.modules["cprfast.channels"] = _channels_standin
    cprfast.channels = _channels_standin  # type: ignore[attr-defined]
