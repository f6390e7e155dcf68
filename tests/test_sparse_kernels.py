"""The hand-written BSR kernels against scipy: every block shape, batch 1 and more, edge sizes, every
schedule, both layouts (linear rows and conv channels)."""

import numpy as np
import pytest
import scipy.sparse as sp

from hwprune.runtimes.tvm.bsr.packing import SparseLayer
from hwprune.runtimes.tvm.bsr.kernels import KernelSpec, Schedule, bsr_primfunc, choose_schedule, im2col_primfunc

tvm = pytest.importorskip("tvm")

TARGET = {"kind": "llvm", "mcpu": "core-avx2"}


def random_layer(o, k, block, density, seed):
    rng = np.random.default_rng(seed)
    r, c = block
    gr, gc = -(-o // r), -(-k // c)
    keep = rng.random((gr, gc)) < density
    w = rng.standard_normal((o, k)).astype(np.float32)
    return SparseLayer.from_dense("w", "linear", w, block, keep), rng


def run_kernel(layer, batch, positions=None, schedule=None):
    o, k = layer.shape
    data, indices, indptr = layer.kernel_arrays()
    spec = KernelSpec(o, k, layer.block, len(indices), batch, positions)
    sched = schedule or choose_schedule(spec)
    lib = tvm.compile(tvm.IRModule({"bsr_matmul": bsr_primfunc(spec, sched)}), target=tvm.target.Target(TARGET))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, k, positions or 1)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((batch, o, positions or 1), np.nan, np.float32))  # NaN: unwritten shows
    lib["bsr_matmul"](*(tvm.runtime.tensor(a) for a in (x, data, indices, indptr)), out)
    # the reference: scipy's BSR product (padded to whole blocks), cropped
    a = layer.to_scipy()
    kp = a.shape[1]
    xp = np.zeros((batch, kp, positions or 1), np.float32)
    xp[:, :k] = x
    ref = np.stack([np.asarray(a @ xp[n])[:o] for n in range(batch)])
    return out.numpy(), ref, sched


# (out, in) sizes are not multiples of the block, so every case has edge blocks on both sides
CASES = [
    ((1, 1), 37, 29), ((4, 1), 37, 29), ((8, 1), 45, 30), ((16, 1), 70, 33), ((32, 1), 70, 21), ((16, 16), 50, 40),
]


BATCHES = [(1, None), (9, None), (2, 11)]  # linear at batch 1 and 9; a conv's 2 samples x 11 positions
# The default run covers every block shape at batch 1 and above and every schedule and tiling path
# (gather, lanes over the batch after a transpose / along positions, rows tiled along samples with a
# remainder tile / along positions, two chains); the rest of the grid is marked slow.
DEFAULT = {((1, 1), 1, None), ((1, 1), 9, None), ((4, 1), 2, 11), ((8, 1), 9, None), ((16, 1), 1, None),
           ((16, 1), 2, 11), ((32, 1), 9, None), ((16, 16), 1, None), ((16, 16), 2, 11)}
GRID = [pytest.param(b, o, k, n, p, marks=() if (b, n, p) in DEFAULT else pytest.mark.slow)
        for b, o, k in CASES for n, p in BATCHES]


@pytest.mark.parametrize("block,o,k,batch,positions", GRID)
def test_kernels_match_scipy(block, o, k, batch, positions):
    layer, _ = random_layer(o, k, block, 0.4, seed=o + k + batch)
    got, ref, sched = run_kernel(layer, batch, positions)
    assert not np.isnan(got).any(), f"{sched}: some outputs were never written"
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=str(sched))


def test_schedule_choice():
    assert choose_schedule(KernelSpec(3072, 768, (16, 1), 40000, 1)) == Schedule("rows", 1, 2)
    assert choose_schedule(KernelSpec(3072, 768, (16, 1), 40000, 16)) == Schedule("rows", 4, 1)
    assert choose_schedule(KernelSpec(3072, 768, (32, 1), 40000, 16)).tile == 2
    assert choose_schedule(KernelSpec(3072, 768, (1, 1), 40000, 1)).strategy == "gather"
    assert choose_schedule(KernelSpec(3072, 768, (4, 1), 40000, 16)).strategy == "batch"
    assert choose_schedule(KernelSpec(160, 1440, (4, 1), 4000, 1, 16)).strategy == "batch"  # conv positions


@pytest.mark.parametrize("schedule", [Schedule("rows", 3, 1), Schedule("batch", 8, 2)])
def test_every_schedule_is_correct_on_any_block(schedule):
    # schedules the chooser would not pick for this shape must still compute the right thing
    layer, _ = random_layer(20, 13, (4, 3), 0.5, seed=3)
    got, ref, _ = run_kernel(layer, 5, None, schedule)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_empty_layer_and_dense_layer():
    layer, _ = random_layer(32, 16, (16, 1), 0.0, seed=0)
    assert layer.nnz_blocks == 0
    got, ref, _ = run_kernel(layer, 1)
    assert (got == 0).all() and (ref == 0).all()
    layer, _ = random_layer(32, 16, (16, 1), 1.0, seed=0)
    got, ref, _ = run_kernel(layer, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_im2col_matches_torch_unfold():
    import torch

    x = torch.randn(2, 3, 7, 6)
    for kernel, stride, padding, dilation in [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0), (1, 2))]:
        f = im2col_primfunc(2, 3, 7, 6, kernel, stride, padding, dilation)
        ref = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).numpy()
        lib = tvm.compile(tvm.IRModule({"im2col": f}), target=tvm.target.Target(TARGET))
        out = tvm.runtime.tensor(np.zeros(ref.shape, np.float32))
        lib["im2col"](tvm.runtime.tensor(x.numpy()), out)
        np.testing.assert_array_equal(out.numpy(), ref)


def test_bsr_round_trip_through_scipy():
    layer, _ = random_layer(37, 29, (8, 4), 0.3, seed=5)
    a = layer.to_scipy()
    assert isinstance(a, sp.bsr_matrix) and a.blocksize == (8, 4) and a.shape == (40, 32)
    np.testing.assert_array_equal(a.toarray()[:37, :29], layer.to_dense())
    csr, _ = random_layer(10, 7, (1, 1), 0.3, seed=5)
    assert isinstance(csr.to_scipy(), sp.csr_matrix)
    np.testing.assert_array_equal(csr.to_scipy().toarray(), csr.to_dense())
