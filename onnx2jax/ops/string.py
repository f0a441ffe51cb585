"""String ops on static strings."""

from __future__ import annotations
