"""A convolution and its exact adjoint as a sum over kernel taps, in array-API operations.

The forward map gathers, for each kernel tap, a strided slice of the padded input
(``stack`` of slices, no scatter), then contracts channels with one batched ``matmul``.
The adjoint contracts with the transposed kernel, spreads each tap's result back with
zeros inserted between strided positions and sums the shifted copies; the adjoint of
zero padding is a crop and the adjoint of circular padding folds the wrapped margins
back with a reshape and a sum. No in-place assignment is used, so the same code runs on
NumPy, PyTorch, JAX, CuPy and ``array_api_strict``.
"""

from __future__ import annotations

from array_api_compat import device as array_device

from lipnorm.conv.geometry import ConvGeometry

__all__ = ["conv_forward", "conv_adjoint"]


def _axis_slice(ndim_total: int, axis: int, sl: slice) -> tuple:
    return (slice(None),) * axis + (sl,) + (slice(None),) * (ndim_total - axis - 1)


def _zero_pad(xp, x, axis: int, lo: int, hi: int):
    """Add ``lo`` zeros before and ``hi`` zeros after along ``axis``; crop if negative."""
    if lo < 0 or hi < 0:
        n = x.shape[axis]
        x = x[_axis_slice(x.ndim, axis, slice(max(-lo, 0), n - max(-hi, 0)))]
        lo, hi = max(lo, 0), max(hi, 0)
    parts = []
    for width in (lo, hi):
        shape = list(x.shape)
        shape[axis] = width
        parts.append(xp.zeros(tuple(shape), dtype=x.dtype, device=array_device(x)))
    if lo == 0 and hi == 0:
        return x
    return xp.concat([parts[0], x, parts[1]], axis=axis)


def _wrap_indices(xp, x, lo: int, length: int, n: int):
    return xp.asarray([(i - lo) % n for i in range(length)], dtype=xp.int64, device=array_device(x))


def _circular_pad(xp, x, axis: int, lo: int, length: int):
    """Periodic extension: entry ``i`` of the result is ``x[(i - lo) mod n]``."""
    return xp.take(x, _wrap_indices(xp, x, lo, length, x.shape[axis]), axis=axis)


def _circular_fold(xp, g, axis: int, lo: int, n: int):
    """Adjoint of :func:`_circular_pad`: sum the entries that wrap onto each of ``n``."""
    length = g.shape[axis]
    before = (-lo) % n
    total = before + length
    after = (-total) % n
    g = _zero_pad(xp, g, axis, before, after)
    shape = g.shape[:axis] + ((before + length + after) // n, n) + g.shape[axis + 1 :]
    return xp.sum(xp.reshape(g, shape), axis=axis)


def _upsample(xp, z, axis: int, step: int):
    """Insert ``step - 1`` zeros between entries along ``axis`` (length ``step*(m-1)+1``)."""
    if step == 1:
        return z
    m = z.shape[axis]
    zero = xp.zeros(z.shape, dtype=z.dtype, device=array_device(z))
    spread = xp.stack([z] + [zero] * (step - 1), axis=axis + 1)
    spread = xp.reshape(spread, z.shape[:axis] + (m * step,) + z.shape[axis + 1 :])
    return spread[_axis_slice(spread.ndim, axis, slice(0, step * (m - 1) + 1))]


def _pad_input(xp, x, geom: ConvGeometry):
    """Pad a (G, cin_g, *n) signal to the (G, cin_g, *read_length) the outputs read."""
    for a, (lo, hi, length, n) in enumerate(zip(geom.pad_lo, geom.pad_hi, geom.read_length, geom.input_size)):
        axis = a + 2
        if geom.circular:
            x = _circular_pad(xp, x, axis, lo, length)
        else:
            x = _zero_pad(xp, x, axis, lo, length - n - lo)
    return x


def _unpad_input(xp, g, geom: ConvGeometry):
    """Adjoint of :func:`_pad_input`."""
    for a, (lo, length, n) in enumerate(zip(geom.pad_lo, geom.read_length, geom.input_size)):
        axis = a + 2
        if geom.circular:
            g = _circular_fold(xp, g, axis, lo, n)
        else:
            g = _zero_pad(xp, g, axis, -lo, n + lo - length)
    return g


def conv_forward(xp, kernel, x, geom: ConvGeometry):
    """Apply the convolution to one channels-first signal.

    Parameters
    ----------
    xp : array namespace
    kernel : array, shape (G, cout_g, cin_g, *kernel_size)
    x : array, shape (cin, *input_size)
    geom : ConvGeometry

    Returns
    -------
    array, shape (cout, *output_size)
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    m = geom.output_size
    padded = _pad_input(xp, xp.reshape(x, (groups, cin_g) + tuple(geom.input_size)), geom)
    slices = []
    for tap in geom.taps():
        index = (slice(None), slice(None)) + tuple(
            slice(j * d, j * d + s * (mm - 1) + 1, s) for j, d, s, mm in zip(tap, geom.dilation, geom.stride, m)
        )
        slices.append(padded[index])
    patches = xp.reshape(xp.stack(slices, axis=2), (groups, cin_g * len(slices), -1))
    out = xp.matmul(xp.reshape(kernel, (groups, cout_g, -1)), patches)
    return xp.reshape(out, (groups * cout_g,) + tuple(m))


def conv_adjoint(xp, kernel, y, geom: ConvGeometry):
    """Apply the adjoint (transpose) of :func:`conv_forward`.

    Parameters
    ----------
    xp : array namespace
    kernel : array, shape (G, cout_g, cin_g, *kernel_size)
    y : array, shape (cout, *output_size)
    geom : ConvGeometry

    Returns
    -------
    array, shape (cin, *input_size)
    """
    groups, cout_g, cin_g = kernel.shape[:3]
    taps = geom.taps()
    m = tuple(geom.output_size)
    flat_kernel = xp.reshape(kernel, (groups, cout_g, cin_g * len(taps)))
    spread = xp.matmul(xp.matrix_transpose(flat_kernel), xp.reshape(y, (groups, cout_g, -1)))
    spread = xp.reshape(spread, (groups, cin_g, len(taps)) + m)
    total = None
    for t, tap in enumerate(taps):
        part = spread[:, :, t, ...]
        for a, (j, d, s, length) in enumerate(zip(tap, geom.dilation, geom.stride, geom.read_length)):
            part = _upsample(xp, part, a + 2, s)
            part = _zero_pad(xp, part, a + 2, j * d, length - j * d - part.shape[a + 2])
        total = part if total is None else total + part
    return xp.reshape(_unpad_input(xp, total, geom), (groups * cin_g,) + tuple(geom.input_size))
