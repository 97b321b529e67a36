"""The torch threads a stage computes with (``*.threads`` settings)."""
from __future__ import annotations


def set_threads(n: int) -> None:
    """Use ``n`` torch threads in this process; 0 or None leaves torch's choice."""
    if n and n > 0:
        import torch

        torch.set_num_threads(n)
