"""Moving pretrained weights to another geometry: patch kernels and relative-position tables.

Both functions reproduce what timm's checkpoint filters compute (to float32 rounding), in numpy,
on timm-layout arrays:

- `resample_patch_kernel`: a patch embedding (conv with stride = kernel size) trained on p x p
  patches, for q x q patches. FlexiViT's pseudo-inverse resize (Beyer et al., 2023,
  arXiv:2212.08013; timm's `resample_patch_embed`): with B the (q*q, p*p) matrix of a bicubic
  resize of a patch, the new kernel w' = w pinv(B) minimises, over patches x, the gap between
  <w, x> and <w', B x>; it is exact (<w', B x> = <w, x>) when upsampling (q >= p).
- `resize_relative_position_bias_table`: a Swin/BEiT table of biases indexed by relative offset
  (dh, dw) in [-(W-1), W-1]^2, for another window. timm's `resize_rel_pos_bias_table` (default,
  no scipy): the source offsets are placed on a geometric progression (BEiT, Bao et al., 2021,
  arXiv:2106.08254) so that the outermost lands just past the new half-width, and the integer
  target offsets are read by bilinear interpolation, clamped at the edges. When shrinking, the
  ratio bottoms out at 1.01: offsets 0 and +-1 are kept exactly, larger ones nearly so (the
  table's centre is cropped, not squeezed).
"""

from __future__ import annotations

import math

import numpy as np

# Keys' a = -0.5: the cubic convolution kernel of torch's antialiased bicubic resize (and PIL's).
CUBIC_A = -0.5


def _cubic(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_resize_matrix(old: int, new: int) -> np.ndarray:
    """(new, old) matrix of `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`.

    Output sample i sits at `center = scale * (i + 0.5)` in input coordinates (scale = old/new).
    When shrinking, the cubic kernel is stretched by `scale` (antialiasing); the taps that fall
    inside the input are renormalised to sum to one (no edge replication).
    """
    scale = old / new
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    matrix = np.zeros((new, old))
    for i in range(new):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)  # int() truncates toward 0, as C++ casts
        last = min(int(center + support + 0.5), old)
        taps = np.arange(first, last)
        weights = _cubic((taps - center + 0.5) / stretch)
        matrix[i, first:last] = weights / weights.sum()
    return matrix


def resample_patch_kernel(kernel: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
    """A (out, in, p_h, p_w) patch-embedding kernel resampled to (out, in, *new_size).

    Example (upsampling is exact: the embedding of a resized patch is the original's):
        >>> w = np.random.default_rng(0).standard_normal((8, 3, 2, 2))
        >>> x = np.random.default_rng(1).standard_normal((3, 2, 2))
        >>> resize = np.kron(bicubic_resize_matrix(2, 4), bicubic_resize_matrix(2, 4))
        >>> big_x = (x.reshape(3, 4) @ resize.T).reshape(3, 4, 4)
        >>> w4 = resample_patch_kernel(w, (4, 4))
        >>> bool(np.allclose(np.einsum("oihw,ihw->o", w4, big_x), np.einsum("oihw,ihw->o", w, x)))
        True
    """
    out_ch, in_ch, old_h, old_w = kernel.shape
    if (old_h, old_w) == tuple(new_size):
        return kernel
    # Row-major flattening of a patch: the 2-D resize is the Kronecker product of the 1-D ones.
    resize = np.kron(
        bicubic_resize_matrix(old_h, new_size[0]), bicubic_resize_matrix(old_w, new_size[1])
    )
    flat = kernel.reshape(out_ch, in_ch, old_h * old_w).astype(np.float64)
    resampled = flat @ np.linalg.pinv(resize)
    return resampled.reshape(out_ch, in_ch, *new_size).astype(kernel.dtype)


def _geometric_offsets(source: int, target: int) -> np.ndarray:
    """Positions of the `source` table rows (offsets -r..r) after BEiT's geometric stretch.

    The ratio q in [1.01, 1.5] is bisected (to 1e-6, keeping the last midpoint) until the
    sum of q^0 .. q^(r-1), the position of the outermost offset r, just exceeds target // 2.
    """
    half = source // 2
    low, high = 1.01, 1.5
    ratio = low
    while high - low > 1e-6:
        ratio = (low + high) / 2.0
        outermost = (1.0 - ratio**half) / (1.0 - ratio)
        low, high = (low, ratio) if outermost > target // 2 else (ratio, high)
    positions = np.cumsum([ratio**i for i in range(half)])
    return np.concatenate([-positions[::-1], [0.0], positions])


def _linear_interpolation_matrix(points: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(queries, points) weights of piecewise-linear interpolation, constant beyond the ends."""
    eye = np.eye(len(points))
    return np.stack([np.interp(queries, points, eye[j]) for j in range(len(points))], axis=1)


def resize_relative_position_bias_table(
    table: np.ndarray, new_window: tuple[int, int]
) -> np.ndarray:
    """A ((2W-1)^2, heads) relative position bias table (square W) for window `new_window`.

    Returns ((2*new_window[0]-1) * (2*new_window[1]-1), heads), rows in the same row-major
    (dh, dw) order that Swin's relative position index reads.

    Example (shrinking keeps the offsets 0 and +-1 exactly):
        >>> table = np.arange(25.0)[:, None]  # window 3: offsets -2..2 on each axis
        >>> resize_relative_position_bias_table(table, (2, 2))[:, 0].reshape(3, 3)
        array([[ 6.,  7.,  8.],
               [11., 12., 13.],
               [16., 17., 18.]])
    """
    rows, heads = table.shape
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"a table of {rows} rows is not a square window's (2W-1)^2")
    new_h, new_w = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    if (side, side) == (new_h, new_w):
        return table
    source = _geometric_offsets(side, new_h), _geometric_offsets(side, new_w)
    targets = np.arange(new_h) - new_h // 2, np.arange(new_w) - new_w // 2
    along_h = _linear_interpolation_matrix(source[0], targets[0])  # (new_h, side)
    along_w = _linear_interpolation_matrix(source[1], targets[1])  # (new_w, side)
    grid = table.astype(np.float64).T.reshape(heads, side, side)
    resized = np.einsum("ah,nhw,bw->nab", along_h, grid, along_w)
    return resized.reshape(heads, new_h * new_w).T.astype(table.dtype)
