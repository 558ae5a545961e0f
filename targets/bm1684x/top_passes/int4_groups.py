"""Group-wise int4 quantization of a [K, N] float32 weight with TPU-MLIR's own arithmetic (A16MatMulAdjust, for
model_deploy's W4BF16/W4F16), on whole arrays: what quantize_weights.py writes as top.A16MatMul.

    per group of `group` along K of the [N, K] weight:
    scale = max(max - min, 1e-5) / 15            (float32)
    zero  = clamp(-round(min / scale), 0, 15)
    code  = clamp(round(w / scale) + zero, 0, 15), two a byte along K, the even one in the low nibble

`round` is C's, half away from zero; numpy's rint rounds half to even, so its ties are moved. `quantize` does it on
whole arrays; `quantize_rows` does it another way for a few output channels (rounding in double), which the pass
checks each result against. Numpy only: it runs in the toolchain's Python (run.py) and is
tested in graphopt's.
"""

from __future__ import annotations

import numpy as np


class Buffers:
    """Scratch arrays reused from weight to weight: on a VM that hands back freed memory, fresh pages cost more
    than the arithmetic."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, dtype, dims: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(dims))
        array = self._arrays.get(name)
        if array is None or array.size < size:
            array = self._arrays[name] = np.empty(size, dtype)
        return array[:size].reshape(dims)


def round_half_away(x: np.ndarray, out: np.ndarray, ties: np.ndarray, exact) -> np.ndarray:
    """C's round(x) into `out`; `x` is left holding |x - rint(x)|, `ties` (bool scratch of x's shape) where that is
    0.5. `exact(flat_indices)`: x's values there again (a tie is exact: x = n + 0.5)."""
    np.rint(x, out=out)
    np.subtract(x, out, out=x)
    np.abs(x, out=x)
    np.equal(x, np.float32(0.5), out=ties)
    where = np.flatnonzero(ties)  # (an 8B MLP weight: 137k ties in 58.7M values)
    if where.size:
        value = exact(where)
        out.reshape(-1)[where] = np.trunc(value) + np.sign(value)  # rint took the even neighbour; C the far one
    return out


def transpose_bytes(a: np.ndarray, tile: int = 64) -> np.ndarray:
    """A 2-D uint8 array transposed through tiles (numpy's byte-by-byte transposing copy is 5x slower)."""
    r, c = a.shape
    if r % tile or c % tile:
        return a.T.copy()
    tiled = np.ascontiguousarray(a.reshape(r // tile, tile, c // tile, tile).transpose(2, 0, 3, 1))
    return np.ascontiguousarray(tiled.transpose(0, 2, 1, 3)).reshape(c, r)


def quantize(weight_kn: np.ndarray, group: int, buffers: Buffers | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [K, N] float32 weight -> (codes [N, K/2] uint8, scales [N, K/group] float32, zero points [N, K/group] uint8).
    The weight is only read."""
    buffers = buffers or Buffers()
    k, n = weight_kn.shape
    w = weight_kn.reshape(k // group, group, n)  # groups run along K
    low, high = w.min(axis=1), w.max(axis=1)
    scale = np.maximum(high - low, np.float32(1e-5))
    scale /= np.float32(15)
    ratio = low / scale
    zero = round_half_away(ratio.copy(), np.empty_like(ratio), np.empty(ratio.shape, bool),
                           lambda where: ratio.reshape(-1)[where])
    np.negative(zero, out=zero)
    np.clip(zero, 0, 15, out=zero)
    quotient = buffers.get("quotient", np.float32, w.shape)
    np.divide(w, scale[:, None, :], out=quotient)

    def quotient_at(where: np.ndarray) -> np.ndarray:  # the division again, element by element
        g, rest = np.divmod(where, group * n)
        return w.reshape(-1)[where] / scale[g, rest % n]

    codes = round_half_away(quotient, buffers.get("codes", np.float32, w.shape), buffers.get("ties", bool, w.shape),
                            quotient_at)
    codes += zero[:, None, :]
    np.maximum(codes, 0, out=codes)
    np.minimum(codes, 15, out=codes)
    small = buffers.get("small", np.uint8, (k // 2, 2, n))
    small[...] = codes.reshape(k // 2, 2, n)
    packed = buffers.get("packed", np.uint8, (k // 2, n))
    np.left_shift(small[:, 1], 4, out=packed)
    packed |= small[:, 0]
    return transpose_bytes(packed), np.ascontiguousarray(scale.T), np.ascontiguousarray(zero.astype(np.uint8).T)


def _c_round(x: np.ndarray) -> np.ndarray:
    """C's round of float32 values: half away from zero, in double (|x| + 0.5 is exact there)."""
    x = x.astype(np.float64)
    return np.copysign(np.floor(np.abs(x) + 0.5), x)


def quantize_rows(weight_kn: np.ndarray, group: int, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize`'s result for output channels `rows` only ([len(rows), K/2] codes, scales, zero points), computed
    another way: a row at a time in [N, K] order, rounding in double, as TPU-MLIR's A16MatMulAdjust loops over it."""
    k = weight_kn.shape[0]
    codes, scales, zeros = [], [], []
    for row in rows:
        values = np.asarray(weight_kn[:, row], dtype=np.float32).reshape(k // group, group)
        low, high = values.min(axis=1), values.max(axis=1)
        scale = (np.maximum(high - low, np.float32(1e-5)) / np.float32(15)).astype(np.float32)
        zero = np.clip(-_c_round(low / scale), 0, 15)
        row_codes = np.clip(_c_round(values / scale[:, None]) + zero[:, None], 0, 15).astype(np.uint8).reshape(-1)
        codes.append(row_codes[0::2] | (row_codes[1::2] << 4))
        scales.append(scale), zeros.append(zero.astype(np.uint8))
    return np.array(codes), np.array(scales), np.array(zeros)
