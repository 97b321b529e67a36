"""The torch threads a stage computes with (``*.threads`` settings)."""
from __future__ import annotations

# torch's own thread count, read before this module first changed it: stages run one after
# another in one process (`guidealign run`), so "0: torch's default" must undo an earlier
# stage's setting, not keep it
_default: int | None = None


def set_threads(n: int | None) -> None:
    """Use ``n`` torch threads in this process; 0 or None: torch's default (the count torch had
    before an earlier stage's setting changed it)."""
    global _default
    if n and n > 0:
        import torch

        if _default is None:
            _default = torch.get_num_threads()
        torch.set_num_threads(n)
    elif _default is not None:
        import torch

        torch.set_num_threads(_default)
