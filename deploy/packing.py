"""Bit packing and flat buffers: how deploy/ stores tensors compactly (pure functions).

torch.save spends about 270 bytes on every stored tensor, so tensors of one kind are
concatenated into one flat buffer (with their names and shapes), and integer codes of b bits
are packed b bits each into bytes.
"""

import math

import torch


def pack_bits(values, num_bits):
    """Non-negative integers below 2**num_bits, num_bits each, little-endian into uint8 bytes."""
    values = values.flatten().to(torch.uint8)
    bits = (values.unsqueeze(1) >> torch.arange(num_bits, dtype=torch.uint8)) & 1
    bits = bits.flatten()
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(-1, 8)
    packed = torch.zeros(len(bits), dtype=torch.uint8)
    for position in range(8):
        packed |= bits[:, position] << position
    return packed


def unpack_bits(packed, num_bits, count):
    """The first `count` integers of `num_bits` bits each from pack_bits' bytes (int64)."""
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bits = bits.flatten()[:count * num_bits].view(count, num_bits).to(torch.int64)
    return (bits << torch.arange(num_bits)).sum(dim=1)


def concat(tensors, dtype=torch.float32):
    """Flat tensors joined into one (an empty tensor of `dtype` for none)."""
    return torch.cat([t.flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=dtype)


def pack_tensors(tensors):
    """{name: float tensor} as one flat float32 buffer plus names and shapes."""
    return {"names": list(tensors), "shapes": [list(t.shape) for t in tensors.values()],
            "values": concat([t.detach().float().cpu() for t in tensors.values()])}


def unpack_tensors(group):
    tensors, offset = {}, 0
    for name, shape in zip(group["names"], group["shapes"]):
        count = math.prod(shape)
        tensors[name] = group["values"][offset:offset + count].view(shape)
        offset += count
    return tensors
