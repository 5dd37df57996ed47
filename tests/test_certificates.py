"""Certified bounds on stacks of matrices (e.g. a convolution's Fourier blocks)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipnorm.certificates import (
    block_grams,
    certified_stack_bounds,
    gram_iteration_block_bounds,
    gram_iteration_bounds,
)
from tests.helpers import NUMERIC_EXAMPLES, assert_contains


@st.composite
def stacks(draw) -> np.ndarray:
    batch = draw(st.integers(1, 40))
    p = draw(st.integers(1, 24))
    q = draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    blocks = rng.standard_normal((batch, p, q))
    if draw(st.booleans()):
        blocks = blocks + 1j * rng.standard_normal((batch, p, q))
    blocks *= 10.0 ** draw(st.floats(-150, 150))
    return blocks


def _stack_truth(blocks: np.ndarray) -> float:
    return float(np.max(np.linalg.svd(blocks, compute_uv=False)[..., 0]))


@settings(max_examples=NUMERIC_EXAMPLES)
@given(blocks=stacks())
def test_cholesky_certificate_contains_the_max_over_the_stack(blocks):
    interval = certified_stack_bounds(blocks)
    assert_contains(interval, _stack_truth(blocks))
    assert interval.upper / interval.lower <= 1 + 1e-5


@settings(max_examples=NUMERIC_EXAMPLES)
@given(blocks=stacks(), steps=st.integers(1, 12))
def test_gram_iteration_contains_the_max_over_the_stack(blocks, steps):
    assert_contains(gram_iteration_bounds(blocks, steps=steps), _stack_truth(blocks))


def test_gram_iteration_tightens_with_steps():
    blocks = np.random.default_rng(0).standard_normal((8, 32, 32))
    truth = _stack_truth(blocks)
    ratios = [gram_iteration_bounds(blocks, steps=s).upper / truth for s in (2, 4, 6, 8)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[-1] < 1.01


def test_a_wrong_estimate_never_breaks_soundness():
    blocks = np.random.default_rng(1).standard_normal((5, 20, 30))
    truth = _stack_truth(blocks)
    for estimate in (0.0, 0.5 * truth, truth, 2.0 * truth):
        interval = certified_stack_bounds(blocks, estimate=estimate)
        assert_contains(interval, truth)


def test_large_single_matrix_uses_lanczos_estimate():
    matrix = np.random.default_rng(2).standard_normal((700, 600))
    interval = certified_stack_bounds(matrix)
    assert_contains(interval, _stack_truth(matrix[None]))
    assert interval.upper / interval.lower <= 1 + 1e-5


def test_gram_iteration_brackets_every_block_and_tightens():
    rng = np.random.default_rng(0)
    blocks = rng.standard_normal((20, 12, 7)) + 1j * rng.standard_normal((20, 12, 7))
    sigma = np.linalg.svd(blocks, compute_uv=False)[:, 0]
    previous = np.inf
    for steps in (2, 4, 8, 12):
        lower, upper = gram_iteration_block_bounds(blocks, steps=steps)
        assert np.all(lower <= sigma) and np.all(sigma <= upper)
        assert upper.max() / sigma.max() <= previous + 1e-12  # tighter with steps, up to rounding margin
        previous = upper.max() / sigma.max()
    assert previous < 1 + 1e-12


def test_gram_iteration_on_exactly_known_diagonal():
    lower, upper = gram_iteration_block_bounds(np.diag([4.0, 4.0, 1.0])[None] + 0j, steps=12)
    assert lower[0] <= 4.0 <= upper[0]
    # two equal top values: ||G_12||_F^(1/2^12) = 4 * 2^(1/2^13) exactly, up to rounding
    np.testing.assert_allclose(upper[0], 4.0 * 2.0 ** (2.0**-13), rtol=1e-12)
    np.testing.assert_allclose(lower[0], 4.0 * 2.0 ** (2.0**-13) / 3.0 ** (2.0**-13), rtol=1e-12)


def test_ranked_estimates_that_miss_the_top_block_fall_back_to_exact_ones(monkeypatch):
    """Many blocks are ranked by a few power steps; a misranked top block must not loosen
    (or break) the certificate: the failed Cholesky sends every block to an exact estimate."""
    import lipnorm.certificates as certificates

    rng = np.random.default_rng(3)
    blocks = rng.standard_normal((40, 12, 9))
    blocks[17] *= 3.0  # the top block
    ranks = []

    def misranked(gram):
        values = np.linalg.eigvalsh(gram)[:, -1]
        values[17] = 0.1 * values.min()  # ranked last: not a candidate
        ranks.append(values)
        return values

    monkeypatch.setattr(certificates, "_ranking_estimates", misranked)
    interval, estimates = certificates.certify_stack(blocks)
    truth = _stack_truth(blocks)
    assert ranks, "the ranked path was not taken"
    assert_contains(interval, truth)
    assert interval.upper <= truth * (1 + 1e-9)
    assert int(np.argmax(estimates)) == 17


def test_matrices_no_factorization_certifies_fall_back_to_a_sound_frobenius_bound(monkeypatch):
    """If the Cholesky certificate never succeeds for some matrix, its bound is its
    Frobenius norm (plus the formation error): looser, never below the truth."""
    import lipnorm.certificates as certificates

    original = certificates._shifted_cholesky_squares

    def never_for_the_first(gram, threshold):
        ok, squares = original(gram, threshold)
        if gram.shape[0] == 6:  # the first attempt covers the whole stack: fail matrix 0 always
            ok[0] = False
        elif gram.shape[0] == 1:
            ok[:] = False
        return ok, squares

    monkeypatch.setattr(certificates, "_shifted_cholesky_squares", never_for_the_first)
    blocks = np.random.default_rng(4).standard_normal((6, 10, 7))
    blocks[0] *= 5.0  # the failing matrix holds the maximum
    interval = certified_stack_bounds(blocks)
    truth = _stack_truth(blocks)
    assert_contains(interval, truth)
    frobenius_of_gram = np.linalg.norm(blocks[0].T @ blocks[0])
    assert interval.upper >= np.sqrt(frobenius_of_gram) * (1 - 1e-12)  # the fallback was used


@settings(max_examples=NUMERIC_EXAMPLES)
@given(blocks=stacks(), chunk_count=st.integers(1, 6), keep=st.booleans())
def test_chunked_gram_certificate_contains_the_max_over_all_chunks(blocks, chunk_count, keep):
    """Chunks share one threshold: the bound holds for the whole stack however it is split,
    whether the chunks are held between the passes or formed again, and its estimates
    index the chunks' matrices in order."""
    from lipnorm.certificates import certify_gram_chunks

    blocks = blocks / np.max(np.abs(blocks))  # Gram entries at most 24: no overflow
    gram = np.conj(np.swapaxes(blocks, -1, -2)) @ blocks
    chunks = np.array_split(np.arange(gram.shape[0]), min(chunk_count, gram.shape[0]))
    calls = []

    def chunk(index):
        calls.append(index)
        return gram[chunks[index]], 1e-12

    certificate = certify_gram_chunks(chunk, len(chunks), complex_dtype=bool(np.iscomplexobj(gram)),
                                      inner=blocks.shape[-2], keep=keep)
    values = np.linalg.eigvalsh(gram)[:, -1]
    assert certificate.upper_squared >= values.max()
    assert certificate.upper_squared <= values.max() * (1 + 1e-6) + 1e-9
    assert certificate.estimates.shape == values.shape
    np.testing.assert_allclose(certificate.estimates[certificate.best], values.max(), rtol=1e-8)
    # held: each chunk formed once; not held: once per pass, and the best chunk once more
    assert len(calls) == (len(chunks) if keep else 2 * len(chunks) + 1)


def test_subnormal_matrices_are_bounded():
    """A matrix whose entries are all subnormal: scaled up by the largest power of two a
    float holds, and still bounded soundly (the scaled matrices are exact, so the truth is)."""
    base = np.random.default_rng(5).standard_normal((7, 5))
    for largest in (1e-310, 1e-320, 5e-324):
        matrix = base / np.max(np.abs(base)) * largest
        truth = _stack_truth(matrix[None] * 2.0**1000)  # exact scaling of subnormals
        for interval in (certified_stack_bounds(matrix), gram_iteration_bounds(matrix, steps=4)):
            assert 0.0 <= interval.lower * 2.0**1000 <= truth <= interval.upper * 2.0**1000, (
                largest, interval, truth * 2.0**-1000)
            assert interval.upper <= 2 * truth * 2.0**-1000 + 1e-322  # still tight


@pytest.mark.parametrize("complex_dtype", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("shape", [(70, 40), (40, 70)], ids=["tall", "wide"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_block_grams_match_the_plain_product_in_either_memory_order(complex_dtype, shape, order):
    """BLAS's rank-k update gets a C-ordered block as its transpose (no copy): the Gram
    matrix is the same, Hermitian, as the plain product's."""
    rng = np.random.default_rng(7)
    blocks = rng.standard_normal((2,) + shape)
    if complex_dtype:
        blocks = blocks + 1j * rng.standard_normal((2,) + shape)
    if order == "F":  # each block Fortran-ordered
        blocks = np.swapaxes(np.ascontiguousarray(np.swapaxes(blocks, -1, -2)), -1, -2)
        assert blocks[0].flags.f_contiguous and not blocks[0].flags.c_contiguous
    gram, formation_error = block_grams(blocks)
    adjoint = np.conj(np.swapaxes(blocks, -1, -2))
    expected = adjoint @ blocks if shape[0] >= shape[1] else blocks @ adjoint
    np.testing.assert_allclose(gram, expected, rtol=0, atol=float(np.max(formation_error)))
    np.testing.assert_array_equal(gram, np.conj(np.swapaxes(gram, -1, -2)))


@pytest.mark.parametrize("complex_dtype", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("shape", [(3, 90, 40), (2, 40, 90), (1, 200, 7)], ids=["tall", "wide", "thin"])
def test_stacks_certified_a_piece_at_a_time_get_the_same_intervals(monkeypatch, complex_dtype, shape):
    """A stack larger than _PIECE_BYTES in float64 is widened a piece at a time: the
    intervals are those of the whole (each Gram entry is the same dot product, summed in
    pieces) and contain each matrix's sigma; a zero matrix still gets (0, 0)."""
    import lipnorm.certificates as certificates

    rng = np.random.default_rng(11)
    blocks = rng.standard_normal(shape)
    if complex_dtype:
        blocks = blocks + 1j * rng.standard_normal(shape)
    blocks = blocks.astype(np.complex64 if complex_dtype else np.float32)
    blocks[-1] = 0.0 if shape[0] > 1 else blocks[-1]
    truths = np.array([np.linalg.norm(b.astype(np.complex128), 2) for b in blocks])
    estimates = truths * (1 + 1e-6)
    whole = certificates.certified_bounds_each(blocks, estimates=estimates)
    monkeypatch.setattr(certificates, "_PIECE_BYTES", 4096)
    pieced = certificates.certified_bounds_each(blocks, estimates=estimates)
    np.testing.assert_allclose(pieced[1], whole[1], rtol=1e-12)
    np.testing.assert_allclose(pieced[0], whole[0], rtol=1e-12)
    for low, high, truth in zip(*pieced, truths):
        assert_contains((low, high), truth)
