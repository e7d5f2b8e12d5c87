"""Rotary position embedding (Su et al. 2021), with the two context-extension rules Llama checkpoints use.

Each pair of channels (x[i], x[i + head_dim/2]) of a query or key at position p is rotated by the angle
p * inv_freq[i], inv_freq[i] = theta^(-2i / head_dim): a dot product of q and k then depends only on
how far apart they are.

    "default"   inv_freq as above
    "linear"    inv_freq / factor: positions squeezed into the trained range (position interpolation)
    "llama3"    Llama 3.1/3.2: long wavelengths (beyond original_max_position_embeddings / low_freq_factor)
                divided by factor, short ones (below .../ high_freq_factor) kept, a smooth blend between
"""

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """inv_freq (head_dim / 2,) for the rope_type in `scaling` (None: "default")."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / theta ** exponents
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short end
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_between = (wavelength >= context / high) & (wavelength <= context / low)
        return torch.where(in_between, blended, scaled)
    return inv_freq


def rotary_cos_sin(positions, inv_freq, dtype):
    """cos and sin of each position's rotation angles, in the rotate-half layout: (B, 1, T, head_dim)."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, head_dim)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x, cos, sin):
    """Rotate each (x[i], x[i + head_dim/2]) pair by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos + rotated_half * sin
