"""SemSim's Spatial-aware Fusion Module (SFM, arXiv 2410.13486 Sec. III-D, Eqs. 14-17).

Three consecutive encoder maps (1/2, 1/4 and 1/8 of the input: the paper's stages 2, 3 and 4) are projected to D
channels and cut into one shared grid of windows, so that the i-th window of every scale covers the same region;
one transformer block lets the tokens of all three scales of a window attend to each other; the scales are put back,
resized to the middle one and fused by a convolution. The output (B, D, *S_mid) is what SemSim's intra- and
cross-image similarities are computed on.

A training-only head: the segmentation network's decoder keeps the plain backbone's skips (the seed's use of SFM
outputs as decoder features is not the paper's), so the exported network is the plain backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, TransformerBlock


def window_partition(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, D, *S) -> (B * prod(grid), prod(S / grid), D): the tokens of each window of a ``grid`` of windows,
    windows in row-major order, tokens row-major within a window."""
    b, d, *size = x.shape
    window = [s // g for s, g in zip(size, grid)]
    split = [n for g, w in zip(grid, window) for n in (g, w)]  # g1, w1, g2, w2, ...
    n = len(size)
    order = [0, *range(2, 2 + 2 * n, 2), *range(3, 3 + 2 * n, 2), 1]  # B, g1.., w1.., D
    return x.reshape(b, d, *split).permute(order).reshape(-1, torch.Size(window).numel(), d)


def window_merge(tokens: torch.Tensor, grid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`window_partition`: (B * prod(grid), prod(S / grid), D) -> (B, D, *S)."""
    window = [s // g for s, g in zip(size, grid)]
    d, n = tokens.shape[-1], len(size)
    x = tokens.reshape(-1, *grid, *window, d)
    order = [0, 2 * n + 1, *(a for i in range(n) for a in (1 + i, 1 + n + i))]  # B, D, g1, w1, g2, w2, ...
    return x.permute(order).reshape(x.shape[0], d, *size)


class SpatialFusionModule(torch.nn.Module):
    """Eqs. 14-17: f = ReLU(Norm(Conv3([I(T^i), T^{i+1}, I(T^{i+2})]))), T the scales after one transformer block over
    the concatenated tokens of each shared window.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the three encoder maps, finest (1/2) first, then 1/4 and 1/8.
        feature_size: D, the common projection width and the output channels (paper 128).
        window_size: the window edge in tokens at the coarsest scale; the 1/4 and 1/2 scales use 2x and 4x, so all
            windows of one group cover the same region (the paper's shared S x S grid, S = coarse size / window_size;
            the paper does not give S).
        num_heads, mlp_ratio: of the transformer block (not given in the paper).
        norm: the normalisation after the fusion convolution (the paper's BN).

    ``forward(features)`` takes the three maps (B, C_k, *S_k) with S_k in ratio 4:2:1 and returns (B, D, *S_mid).
    There is no positional embedding (the paper gives none): attention within a window group is order-free, and the
    positions are recovered only by the un-partitioning and the 3 x 3 fusion convolution.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        feature_size: int = 128,
        window_size: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"SpatialFusionModule works on 2D or 3D maps, got spatial_dims={spatial_dims}")
        if len(in_channels) != 3:
            raise ValueError(
                "SpatialFusionModule fuses three consecutive encoder maps (1/2, 1/4, 1/8 of the input), "
                f"got in_channels={list(in_channels)}"
            )
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.spatial_dims, self.in_channels = spatial_dims, tuple(in_channels)
        self.feature_size, self.window_size = feature_size, window_size
        self.projections = torch.nn.ModuleList(
            Convolution(spatial_dims, c, feature_size, kernel_size=1, conv_only=True) for c in in_channels
        )
        # Eq. 15: pre-norm MSA and MLP with residuals; SDPA attention (flash / memory-efficient kernels on GPU)
        self.block = TransformerBlock(
            hidden_size=feature_size,
            mlp_dim=int(feature_size * mlp_ratio),
            num_heads=num_heads,
            qkv_bias=True,
            use_flash_attention=True,
        )
        # MONAI builds this LayerNorm even without cross-attention; a parameter that never gets a gradient would make
        # DistributedDataParallel fail (without find_unused_parameters), so drop it
        del self.block.norm_cross_attn
        # Eq. 17; no bias: the normalisation that follows removes it
        self.fusion = Convolution(
            spatial_dims, 3 * feature_size, feature_size, kernel_size=3, norm=norm, act="relu", bias=False
        )

    def check_sizes(self, sizes: Sequence[Sequence[int]]) -> None:
        """Refuse maps whose sizes are not in ratio 4:2:1 or whose coarse size is not a multiple of window_size."""
        fine, mid, coarse = (list(s) for s in sizes)
        step = 8 * self.window_size
        if fine != [4 * c for c in coarse] or mid != [2 * c for c in coarse]:
            raise ValueError(
                f"SpatialFusionModule needs encoder maps at 1/2, 1/4 and 1/8 of the input (sizes in "
                f"ratio 4:2:1), got {fine}, {mid}, {coarse}: use a roi_size divisible by {step} along "
                f"every axis (8 x window_size {self.window_size})"
            )
        if any(c % self.window_size for c in coarse):
            raise ValueError(
                f"the coarsest encoder map {coarse} is not divisible by the SFM window_size "
                f"{self.window_size}: use a roi_size divisible by {step} along every axis, or a "
                f"window_size that divides {coarse}"
            )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != 3:
            raise ValueError(f"SpatialFusionModule takes three encoder maps (1/2, 1/4, 1/8), got {len(features)}")
        sizes = [f.shape[2:] for f in features]
        self.check_sizes(sizes)
        grid = [c // self.window_size for c in sizes[2]]  # the shared window grid, the same at every scale
        # Eq. 14: per window group, the tokens of the three scales one after the other
        tokens = [window_partition(proj(f), grid) for proj, f in zip(self.projections, features)]
        lengths = [t.shape[1] for t in tokens]
        mixed = self.block(torch.cat(tokens, dim=1))  # Eq. 15
        # Eq. 16: split in concatenation order and put each scale back in place
        scales = [window_merge(t, grid, s) for t, s in zip(mixed.split(lengths, dim=1), sizes)]
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        mid = sizes[1]
        resized = [
            F.interpolate(s, size=mid, mode=mode, align_corners=False) if s.shape[2:] != mid else s for s in scales
        ]
        return self.fusion(torch.cat(resized, dim=1))  # Eq. 17
