"""DFT, STFT, window functions and MelWeightMatrix."""

from __future__ import annotations
