"""RNN, GRU and LSTM."""

from __future__ import annotations
