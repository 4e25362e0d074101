"""Lossless passes: the default pipeline (exact up to float rounding; never a bigger model)."""
