"""If, Loop and Scan."""

from __future__ import annotations
