"""Discrete-event simulator: the real scheduler and policies on synthetic request traces."""
