"""Bit-packing of binary masks: 1 bit per element, little-endian within each byte."""

import torch

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a boolean mask and pack it into ceil(numel / 8) uint8 values."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of pack_bits: a boolean tensor of `shape`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    bits = (packed.reshape(-1, 1) & _WEIGHTS) != 0
    return bits.reshape(-1)[:numel].reshape(tuple(shape))
