"""Classifier heads for continual learning: a fixed simplex-ETF head that grows with the classes
(:class:`ETFHead`, the geometry of ProNC), and its DR loss."""

from .etf import ETFHead, dr_loss

__all__ = ["ETFHead", "dr_loss"]
