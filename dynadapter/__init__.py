"""Dyn-Adapter: early-exit, parameter-efficient adaptation of frozen Vision Transformers."""

__version__ = "0.1.0"
