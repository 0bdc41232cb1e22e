"""Bit-packing of binary masks: 1 bit per element, little-endian within each byte."""

import torch
import torch.nn.functional as F

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


# byte value → its 8 bits as float, little-endian as pack_bits writes them; one copy per device
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float()
_BYTE_BITS_ON: dict[torch.device, torch.Tensor] = {}


def unpack_bits_scaled(packed: torch.Tensor, numel: int, value: float = 1.0,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """value × the bits pack_bits packed, float32 and flat: the first `numel` (one table lookup
    per byte), or only those at the flat `positions`."""
    if positions is None:
        table = _BYTE_BITS_ON.get(packed.device)
        if table is None:
            table = _BYTE_BITS_ON[packed.device] = _BYTE_BITS.to(packed.device)
        if value != 1.0:
            table = table * value
        return F.embedding(packed.long(), table).reshape(-1)[:numel]
    bits = ((packed[positions >> 3] >> (positions & 7)) & 1).float()
    return bits.mul_(value) if value != 1.0 else bits
