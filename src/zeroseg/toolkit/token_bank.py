"""FIFO bank of past global CLS tokens (CLIP-to-Seg Sec. III-C, Eq. 4: the negatives of the
global distillation).

The bank holds the global CLS tokens ``C_g`` of the most recent training images of all DDP ranks
(tokens are all-gathered before they enter, so every rank holds the same bank). Its size is a
config value: 24 in the paper's Implementation Details, 6 best in Table IX (default 24). The bank
is made of persistent buffers, so it is saved in checkpoints and a resumed run continues with the
same negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["TokenBank", "gather_across_ranks"]


def gather_across_ranks(tokens: Tensor) -> Tensor:
    """Concatenate ``tokens`` of every DDP rank in rank order (no-op without a process group).

    Every rank must contribute the same number of tokens (the training loader drops the last
    incomplete batch, so it does).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tokens
    gathered = [torch.empty_like(tokens) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tokens.contiguous())
    return torch.cat(gathered, dim=0)


class TokenBank(nn.Module):
    """A first-in-first-out bank of ``size`` vectors of dimension ``dim``.

    ``push`` adds a batch (gathered across ranks; the newest ``size`` are kept when a batch is
    larger than the bank); ``tokens()`` returns the filled part, oldest first.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"token bank size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("next_slot", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, tokens: Tensor, gather: bool = True) -> None:
        tokens = gather_across_ranks(tokens.detach()) if gather else tokens.detach()
        tokens = tokens[-self.size :].to(self.bank.dtype)
        count = tokens.shape[0]
        slots = (self.next_slot + torch.arange(count, device=self.bank.device)) % self.size
        self.bank[slots] = tokens
        self.next_slot.copy_((self.next_slot + count) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count, max=self.size))

    def tokens(self) -> Tensor:
        """The stored vectors, oldest first: ``(min(pushed, size), dim)``."""
        filled = int(self.filled)
        if filled < self.size:
            return self.bank[:filled]
        return torch.roll(self.bank, shifts=-int(self.next_slot), dims=0)
