"""models/native: the compiled Gaussian kernels are built once into the cache, reused, checked,
and absent (None, with the reason) where they cannot be built."""
import numpy as np
import pytest

import models.native as native


def needs_compiler():
    if native.find_compiler() is None:
        pytest.skip("no C compiler on this machine")


def test_builds_once_into_the_cache_then_reuses_the_library(tmp_path):
    needs_compiler()
    first = native.load_kernels(directory=tmp_path)
    built = first.path.stat().st_mtime_ns
    second = native.load_kernels(directory=tmp_path)
    assert second.path == first.path and second.path.parent == tmp_path
    assert second.path.stat().st_mtime_ns == built          # not compiled again
    assert not list(tmp_path.glob("*.tmp"))                 # no half-written files left


@pytest.mark.parametrize("positions_first", [False, True])
def test_kernels_equal_a_float64_reference_across_block_edges(tmp_path, positions_first):
    """37 positions (two full blocks of 16 and a partial one), d = 10 (not a multiple of the
    4x4 tiles), batches of 1 and 5 images (B * d not a multiple of 16 either), the batches as
    [B, d, P] or [P, B, d]."""
    needs_compiler()
    kernels = native.load_kernels(directory=tmp_path)
    rng = np.random.default_rng(4)
    n, d, positions = 23, 10, 37
    x = (rng.normal(size=(n, positions, d)) @ rng.normal(size=(d, d)) + 5).astype(np.float32).transpose(0, 2, 1).copy()
    shift = np.ascontiguousarray(x[:5].mean(axis=0))
    blocks = kernels.blocks(positions)
    gram = np.full((blocks * kernels.lanes, d, d), np.nan, dtype=np.float32)   # the first batch writes
    sums = np.full((blocks, d, kernels.lanes), np.nan)
    for start, stop in [(0, 1), (1, 6), (6, 11), (11, 16), (16, 21), (21, 23)]:
        batch = np.ascontiguousarray(x[start:stop].transpose(2, 0, 1) if positions_first else x[start:stop])
        for block0, block1 in [(0, 1), (1, blocks)]:
            kernels.gram_update(batch, shift, gram, sums, block0, block1, first=start == 0,
                                positions_first=positions_first)
    assert kernels.whitening(gram, sums, n, d, positions, 0.01, 0, blocks) == (-1, False)
    whitening = gram[:positions].astype(np.float64)
    assert np.allclose(np.tril(whitening, -1), 0)           # upper triangular: L^-T
    samples = x.astype(np.float64).transpose(2, 0, 1)
    covariance = np.stack([np.cov(s, rowvar=False) + 0.01 * np.eye(d) for s in samples])
    np.testing.assert_allclose(np.linalg.inv(whitening @ whitening.transpose(0, 2, 1)), covariance, rtol=1e-4, atol=1e-4)
    mean = shift.T + sums.transpose(0, 2, 1).reshape(-1, d)[:positions] / n
    np.testing.assert_allclose(mean, samples.mean(axis=1), rtol=1e-5, atol=1e-4)


def test_no_compiler_is_a_clear_error(tmp_path):
    with pytest.raises(native.KernelError, match="failed|No such file|not found"):
        native.load_kernels(compiler=str(tmp_path / "no-such-cc"), directory=tmp_path)


def test_a_failing_compiler_is_reported_and_leaves_no_file(tmp_path):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'broken toolchain' >&2\nexit 1\n")
    compiler.chmod(0o755)
    with pytest.raises(native.KernelError, match="broken toolchain"):
        native.load_kernels(compiler=str(compiler), directory=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))


def test_padim_native_0_switches_the_kernels_off(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("PADIM_NATIVE", "0")
    assert native.gaussian_kernels() is None
    assert "PADIM_NATIVE=0" in native.kernel_status()


def test_a_folder_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(native.KernelError, match="not a private folder"):
        native._check_private(shared)
    private = tmp_path / "private"
    native._check_private(private)            # created 0700: fine
    assert private.stat().st_mode & 0o077 == 0


def _distances_float64(test, mean, whitening):
    whitened = np.einsum("pbi,pij->pbj", test.astype(np.float64) - mean[:, None, :], whitening.astype(np.float64))
    return np.sqrt((whitened ** 2).sum(axis=2)).T


@pytest.mark.parametrize("d", [5, 16, 37, 100])
@pytest.mark.parametrize("batch", [1, 9])
def test_scoring_skips_only_zeros_of_permuted_triangles(tmp_path, d, batch):
    """Triangular whitening with rows permuted (what a model holds): the row structure found by
    row_support, then the distances with and without it, against float64 einsum. d = 5 pads the
    columns, 37 and 100 end on an overlapping block of 16, 16 has no remainder."""
    needs_compiler()
    kernels = native.load_kernels(directory=tmp_path)
    rng = np.random.default_rng(d + batch)
    positions = 7
    permutation = rng.permutation(d)
    triangles = np.triu(rng.normal(size=(positions, d, d)) + 3).astype(np.float32)
    whitening = np.ascontiguousarray(triangles[:, permutation, :])       # row i: triangle row permutation[i]
    first = np.full(d, d, dtype=np.int32)
    kernels.row_support(whitening, 0, 3, first)
    kernels.row_support(whitening, 3, positions, first)                 # chunks lower the same array
    np.testing.assert_array_equal(first, permutation)
    order = np.argsort(first, kind="stable").astype(np.int32)
    test = rng.normal(size=(positions, batch, d)).astype(np.float32)
    mean = rng.normal(size=(positions, d)).astype(np.float32)
    expected = _distances_float64(test, mean, whitening)
    for rows in [(order, first[order]), None]:
        out = np.full((batch, positions), np.nan, dtype=np.float32)
        kernels.mahalanobis(test, mean, whitening, out, 0, 4, rows)
        kernels.mahalanobis(test, mean, whitening, out, 4, positions, rows)
        np.testing.assert_allclose(out, expected, rtol=2e-5)


def test_row_support_sees_a_single_entry_at_one_position_and_nan(tmp_path):
    needs_compiler()
    kernels = native.load_kernels(directory=tmp_path)
    d, positions = 40, 5
    whitening = np.zeros((positions, d, d), dtype=np.float32)
    whitening[:, np.arange(d), np.arange(d) // 2 + d // 2] = 1.0   # row i starts at column i // 2 + 20
    whitening[3, 7, 2] = -1e-30                                     # one tiny entry at one position
    whitening[1, 30, 0] = np.nan
    first = np.full(d, d, dtype=np.int32)
    kernels.row_support(whitening, 0, positions, first)
    expected = np.arange(d) // 2 + d // 2
    expected[7], expected[30] = 2, 0
    np.testing.assert_array_equal(first, expected)


def test_clang_builds_the_same_kernels(tmp_path):
    """The source sticks to what GCC and clang both accept (macOS's cc is clang): built with
    clang, the kernels pass the same float64 self-check. Skipped where clang is missing."""
    import shutil

    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("no clang on this machine")
    kernels = native.load_kernels(compiler=clang, directory=tmp_path)   # load_kernels runs the self-check
    assert kernels.path.parent == tmp_path
