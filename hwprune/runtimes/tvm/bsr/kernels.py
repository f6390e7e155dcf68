"""Hand-written block-sparse (BSR) kernels in TVMScript: ``y = x · Wᵀ`` with ``W`` stored in blocks.

``W`` is ``O x K`` (output x input features) cut into ``R x C`` blocks; only the kept blocks are
stored, as in scipy's BSR: ``indptr`` (one entry per block row + 1), ``indices`` (the block column
of each stored block) and ``data``, which here is laid out ``(nnz, C, R)`` so that the ``R`` output
rows of one block column are contiguous and load as one vector
(:meth:`hwprune.runtimes.tvm.bsr.packing.SparseLayer.kernel_arrays`).

Two input layouts, both with a static batch:

* ``rows`` (linear layers): ``x (N, K) -> y (N, O)``, passed as ``(N, K, 1)`` / ``(N, O, 1)``;
* ``channels`` (convolutions after im2col, ``P`` = output positions): ``x (N, K, P) -> y (N, O, P)``.

Three schedules, chosen by :func:`choose_schedule` from the block shape and the batch:

* ``rows``: vector lanes over the ``R`` output rows of a block (R >= 8 fills AVX2's 8 fp32 lanes),
  the accumulators stay in registers across the block row, and a tile of batch columns reuses each
  block that was loaded (the block row's data stays in L1 while the tiles go by). At batch 1 two
  independent accumulator chains hide the FMA latency.
* ``batch``: for narrow blocks (R < 8) and 8 or more batch columns: vector lanes over the batch
  (x is read as ``(K, batch)``; the rows layout is transposed into a scratch buffer first), one scalar
  weight broadcast per lane vector.
* ``gather``: unstructured (1x1) at a small batch: lanes over 8 consecutive non-zeros of a row, x read
  with a vector gather, one horizontal sum per row.

Every shape is a compile-time constant (one PrimFunc per layer); the sparsity pattern is data
(``indptr``/``indices``), so the code size does not grow with the number of blocks.

Example:
    >>> spec = KernelSpec(out_features=64, in_features=32, block=(16, 1), nnz=40, batch=1)
    >>> func = bsr_primfunc(spec)
    >>> choose_schedule(spec).strategy
    'rows'
"""

from __future__ import annotations

from dataclasses import dataclass

# Vector registers the accumulators may use: AVX2 has 16 ymm registers; 8 hold accumulators, the rest
# the broadcast input and the loaded weights. Measured for 16x1 blocks at batch 16 (time / onnxruntime):
# tile 2 (4 accumulators) 0.45x, tile 4 (8) 0.32x, tile 8 (16, LLVM spills) 0.34x.
ACC_REGISTERS = 8
LANES = 8  # fp32 lanes of one AVX2 register


@dataclass(frozen=True)
class KernelSpec:
    """Shapes of one sparse layer as a matrix product (all static).

    ``positions`` is None for the rows layout ``x (N, K)``; an int ``P`` for the channels layout
    ``x (N, K, P)``.
    """

    out_features: int
    in_features: int
    block: tuple[int, int]
    nnz: int
    batch: int
    positions: int | None = None

    def __post_init__(self):
        r, c = self.block
        for name, v in (("out_features", self.out_features), ("in_features", self.in_features), ("block rows", r),
                        ("block cols", c), ("nnz", self.nnz), ("batch", self.batch)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KernelSpec: {name} must be a positive integer, got {v!r}")
        if self.positions is not None and (not isinstance(self.positions, int) or self.positions < 1):
            raise ValueError(f"KernelSpec: positions must be a positive integer or None, got {self.positions!r}")
        if self.nnz > self.block_rows * self.block_cols:
            raise ValueError(f"KernelSpec: {self.nnz} blocks do not fit a {self.block_rows}x{self.block_cols} block grid")

    @property
    def block_rows(self) -> int:
        return -(-self.out_features // self.block[0])

    @property
    def block_cols(self) -> int:
        return -(-self.in_features // self.block[1])

    @property
    def x_shape(self) -> tuple[int, ...]:
        n, k = self.batch, self.in_features
        return (n, k) if self.positions is None else (n, k, self.positions)

    @property
    def out_shape(self) -> tuple[int, ...]:
        n, o = self.batch, self.out_features
        return (n, o) if self.positions is None else (n, o, self.positions)

    @property
    def columns(self) -> int:
        """Batch columns of the product: N, or N·P."""
        return self.batch * (self.positions or 1)


@dataclass(frozen=True)
class Schedule:
    """How a kernel is laid out: ``strategy`` (rows | batch | gather), the batch ``tile`` (rows) or
    lane count (batch, gather), and ``chains`` (independent accumulators in the rows strategy)."""

    strategy: str
    tile: int
    chains: int = 1


def _tile_extent(spec: KernelSpec) -> int:
    """Length of the batch axis the rows schedule tiles: P for convolutions, else N."""
    return spec.positions if spec.positions and spec.positions > 1 else spec.batch


def choose_schedule(spec: KernelSpec) -> Schedule:
    """The schedule for a layer (see the module docstring for the reasons).

    Measured on this repo's 2-core EPYC (W 3072 x 768, 70% of the blocks removed, batch 16, time /
    onnxruntime): the rows schedule with a 16 x 4 tile 0.32x (tile 2: 0.45x); narrow blocks need the
    batch schedule (4x1: 0.24x against 0.59x with rows); two accumulator chains when the lanes fill
    fewer than 4 registers (1x1: 0.50x against 0.75x with one chain: an FMA waits 4 cycles for the last).

    Example:
        >>> choose_schedule(KernelSpec(3072, 768, (16, 1), 44000, batch=16))
        Schedule(strategy='rows', tile=4, chains=1)
        >>> choose_schedule(KernelSpec(3072, 768, (1, 1), 700000, batch=16))
        Schedule(strategy='batch', tile=16, chains=2)
    """
    r, c = spec.block
    regs_per_row = -(-r // LANES)
    lane_extent = spec.positions if spec.positions and spec.positions > 1 else (spec.batch if spec.positions is None else 1)
    if r < LANES and lane_extent >= LANES:
        # lanes over the batch: R rows x (lanes / 8) registers of accumulators
        lanes = min(LANES * max(1, min(4, ACC_REGISTERS // r)), _round_up(lane_extent, LANES))
        return Schedule("batch", lanes, 2 if r * lanes // LANES < 4 else 1)
    if r == 1 and c == 1:
        return Schedule("gather", LANES)
    tile = max(1, min(ACC_REGISTERS // regs_per_row, _tile_extent(spec)))
    chains = 1 if tile > 1 else (4 if r < LANES else 2)
    return Schedule("rows", tile, chains)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def bsr_primfunc(spec: KernelSpec, schedule: Schedule | None = None, name: str = "bsr_matmul"):
    """A TVMScript PrimFunc ``name(x, data, indices, indptr, out)`` computing ``out = x · Wᵀ``.

    ``data`` is ``(nnz, C, R)`` float32, ``indices`` ``(nnz,)`` int32, ``indptr`` ``(block_rows + 1,)``
    int32 (see :meth:`hwprune.runtimes.tvm.bsr.packing.SparseLayer.kernel_arrays`). Rows past ``out_features`` and columns past
    ``in_features`` in edge blocks are never written / read.

    Example:
        >>> import tvm
        >>> f = bsr_primfunc(KernelSpec(64, 32, (16, 1), nnz=40, batch=4))
        >>> lib = tvm.compile(tvm.IRModule({"bsr_matmul": f}), target="llvm")
        >>> [p.name for p in f.params]
        ['x', 'data', 'indices', 'indptr', 'out']
    """
    schedule = schedule or choose_schedule(spec)
    builders = {"rows": _rows_kernel, "batch": _batch_kernel, "gather": _gather_kernel}
    if schedule.strategy not in builders:
        raise ValueError(f"unknown kernel strategy {schedule.strategy!r}; expected one of {', '.join(builders)}")
    func = builders[schedule.strategy](spec, schedule)
    return func.with_attr("global_symbol", name)


# ---------------------------------------------------------------------------------------------------
# Kernels. Both layouts are handled as x (N, K, P): the rows layout is P = 1 (the caller passes a
# (N, K) tensor reshaped to (N, K, 1), a free view). A batch tile runs along P when P > 1 (columns of
# one sample are contiguous) and along N otherwise; (SN, SP) is the step of the tile in (n, p).


def _geometry(spec: KernelSpec):
    P = spec.positions or 1
    along_p = P > 1
    return P, along_p, ((0, 1) if along_p else (1, 0)), (P if along_p else spec.batch)


def _rows_kernel(spec: KernelSpec, sched: Schedule):
    from tvm.script import tirx as T

    N, K, O = spec.batch, spec.in_features, spec.out_features
    R, C = spec.block
    nnz, Ob = spec.nnz, spec.block_rows
    P, along_p, (SN, SP), E = _geometry(spec)
    BT, H = sched.tile, sched.chains
    n_tiles, rem = divmod(E, BT)
    full_rows, last_rows = divmod(O, R)
    edge = K % C != 0

    def chain_sum(acc, bi, r):
        s = acc[0, bi, r]
        for h in range(1, H):
            s = s + acc[h, bi, r]
        return s

    def x_at(x, n, p, k):
        v = x[n, k, p]
        # columns past K in an edge block read 0 (their weights are 0 too, but x could hold inf)
        return T.if_then_else(k < K, v, T.float32(0)) if edge else v

    @T.macro
    def block_row(x, data, indices, indptr, out, ob, n0, p0, bt, nrows):
        acc = T.alloc_buffer((H, bt, R), "float32", scope="global")  # small + "global" = an LLVM alloca
        for h in T.unroll(H):
            for bi in T.unroll(bt):
                for r in T.vectorized(R):
                    acc[h, bi, r] = T.float32(0)
        # No scalar `name = value` here: in an s_tir PrimFunc it becomes a one-element buffer, and its
        # store made LLVM reload indptr and indices after every FMA (measured 2x slower).
        for jj in range((indptr[ob + 1] - indptr[ob]) // H):
            for h in T.unroll(H):
                for c in T.unroll(C):
                    for bi in T.unroll(bt):
                        for r in T.vectorized(R):
                            acc[h, bi, r] = acc[h, bi, r] + data[indptr[ob] + jj * H + h, c, r] * x_at(
                                x, n0 + bi * SN, p0 + bi * SP, indices[indptr[ob] + jj * H + h] * C + c)
        if H > 1:
            for j in range(indptr[ob] + (indptr[ob + 1] - indptr[ob]) // H * H, indptr[ob + 1]):
                for c in T.unroll(C):
                    for bi in T.unroll(bt):
                        for r in T.vectorized(R):
                            acc[0, bi, r] = acc[0, bi, r] + data[j, c, r] * x_at(
                                x, n0 + bi * SN, p0 + bi * SP, indices[j] * C + c)
        for bi in T.unroll(bt):
            if nrows == R:
                for r in T.vectorized(R):
                    out[n0 + bi * SN, ob * R + r, p0 + bi * SP] = chain_sum(acc, bi, r)
            else:
                for r in range(nrows):
                    out[n0 + bi * SN, ob * R + r, p0 + bi * SP] = chain_sum(acc, bi, r)

    @T.macro
    def one_row(x, data, indices, indptr, out, ob, nrows):
        if along_p:
            for n in range(N):
                for t in range(n_tiles):
                    block_row(x, data, indices, indptr, out, ob, n, t * BT, BT, nrows)
                if rem > 0:
                    block_row(x, data, indices, indptr, out, ob, n, n_tiles * BT, rem, nrows)
        else:
            for t in range(n_tiles):
                block_row(x, data, indices, indptr, out, ob, t * BT, 0, BT, nrows)
            if rem > 0:
                block_row(x, data, indices, indptr, out, ob, n_tiles * BT, 0, rem, nrows)

    @T.prim_func(s_tir=True)
    def bsr_rows(x: T.Buffer((N, K, P), "float32"), data: T.Buffer((nnz, C, R), "float32"),
                 indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((Ob + 1,), "int32"),
                 out: T.Buffer((N, O, P), "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):  # Relax passes (RewriteDataflowReshape) want a root block
            for ob in range(full_rows):
                one_row(x, data, indices, indptr, out, ob, R)
            if last_rows > 0:
                one_row(x, data, indices, indptr, out, full_rows, last_rows)

    return bsr_rows


def _batch_kernel(spec: KernelSpec, sched: Schedule):
    from tvm.script import tirx as T

    N, K, O = spec.batch, spec.in_features, spec.out_features
    R, C = spec.block
    nnz, Ob = spec.nnz, spec.block_rows
    P, along_p, (SN, SP), E = _geometry(spec)
    V, H = sched.tile, sched.chains
    n_tiles, rem = divmod(E, V)
    full_rows, last_rows = divmod(O, R)
    edge = K % C != 0
    outer = N if along_p else 1  # samples handled one after the other (along P only)

    def x_at(x, xt, n, k, e):
        return x[n, k, e] if along_p else xt[k, e]

    def chain_sum(acc, r, v):
        s = acc[0, r, v]
        for h in range(1, H):
            s = s + acc[h, r, v]
        return s

    @T.macro
    def add_block(acc, h, x, xt, data, indices, j, n, e0, vt):
        for c in T.unroll(C):
            if edge:
                if indices[j] * C + c < K:
                    for r in T.unroll(R):
                        for v in T.vectorized(vt):
                            acc[h, r, v] = acc[h, r, v] + data[j, c, r] * x_at(x, xt, n, indices[j] * C + c, e0 + v)
            else:
                for r in T.unroll(R):
                    for v in T.vectorized(vt):
                        acc[h, r, v] = acc[h, r, v] + data[j, c, r] * x_at(x, xt, n, indices[j] * C + c, e0 + v)

    @T.macro
    def tile(x, xt, data, indices, indptr, out, ob, n, e0, vt, nrows):
        acc = T.alloc_buffer((H, R, vt), "float32", scope="global")
        for h in T.unroll(H):
            for r in T.unroll(R):
                for v in T.vectorized(vt):
                    acc[h, r, v] = T.float32(0)
        for jj in range((indptr[ob + 1] - indptr[ob]) // H):
            for h in T.unroll(H):
                add_block(acc, h, x, xt, data, indices, indptr[ob] + jj * H + h, n, e0, vt)
        if H > 1:
            for j in range(indptr[ob] + (indptr[ob + 1] - indptr[ob]) // H * H, indptr[ob + 1]):
                add_block(acc, 0, x, xt, data, indices, j, n, e0, vt)
        for r in range(nrows):
            for v in T.vectorized(vt):
                out[n + (e0 + v) * SN, ob * R + r, (e0 + v) * SP] = chain_sum(acc, r, v)

    @T.macro
    def one_row(x, xt, data, indices, indptr, out, ob, nrows):
        for n in range(outer):
            for t in range(n_tiles):
                tile(x, xt, data, indices, indptr, out, ob, n, t * V, V, nrows)
            if rem > 0:
                tile(x, xt, data, indices, indptr, out, ob, n, n_tiles * V, rem, nrows)

    @T.prim_func(s_tir=True)
    def bsr_batch(x: T.Buffer((N, K, P), "float32"), data: T.Buffer((nnz, C, R), "float32"),
                  indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((Ob + 1,), "int32"),
                  out: T.Buffer((N, O, P), "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):  # Relax passes (RewriteDataflowReshape) want a root block
            # Along N the samples are K apart in x: transpose once so that a lane vector is one load.
            xt = T.alloc_buffer((K, 1 if along_p else N), "float32")
            if not along_p:
                for k, n in T.grid(K, N):
                    xt[k, n] = x[n, k, 0]
            for ob in range(full_rows):
                one_row(x, xt, data, indices, indptr, out, ob, R)
            if last_rows > 0:
                one_row(x, xt, data, indices, indptr, out, full_rows, last_rows)

    return bsr_batch


def _gather_kernel(spec: KernelSpec, sched: Schedule):
    from tvm.script import tirx as T

    N, K, O = spec.batch, spec.in_features, spec.out_features
    nnz = spec.nnz
    P = spec.positions or 1
    V = sched.tile

    @T.prim_func(s_tir=True)
    def bsr_gather(x: T.Buffer((N, K, P), "float32"), data: T.Buffer((nnz, 1, 1), "float32"),
                   indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((O + 1,), "int32"),
                   out: T.Buffer((N, O, P), "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):  # Relax passes (RewriteDataflowReshape) want a root block
            for o in range(O):
                for n, p in T.grid(N, P):
                    acc = T.alloc_buffer((V,), "float32", scope="global")
                    total = T.alloc_buffer((1,), "float32", scope="global")
                    for v in T.vectorized(V):
                        acc[v] = T.float32(0)
                    for jj in range((indptr[o + 1] - indptr[o]) // V):
                        for v in T.vectorized(V):
                            acc[v] = acc[v] + data[indptr[o] + jj * V + v, 0, 0] * x[n, indices[indptr[o] + jj * V + v], p]
                    total[0] = T.float32(0)
                    for j in range(indptr[o] + (indptr[o + 1] - indptr[o]) // V * V, indptr[o + 1]):
                        total[0] = total[0] + data[j, 0, 0] * x[n, indices[j], p]
                    for v in range(V):
                        total[0] = total[0] + acc[v]
                    out[n, o, p] = total[0]

    return bsr_gather


def im2col_primfunc(batch: int, channels: int, height: int, width: int, kernel, stride, padding, dilation,
                    name: str = "im2col"):
    """``cols (N, C·kh·kw, Ho·Wo)`` from ``x (N, C, H, W)``: the input of a k x k conv as the matrix the
    BSR kernel multiplies (rows in the order of ``weight.reshape(C_out, -1)``). Padding is read as 0
    (a bounds test, no padded copy); the innermost loop runs along output columns, contiguous in x at
    stride 1.

    Example:
        >>> f = im2col_primfunc(1, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1))
        >>> [p.name for p in f.params]
        ['x', 'cols']
    """
    from tvm.script import tirx as T

    N, C, H, W = batch, channels, height, width
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    @T.prim_func(s_tir=True)
    def im2col(x: T.Buffer((N, C, H, W), "float32"), cols: T.Buffer((N, C * kh * kw, Ho * Wo), "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):  # Relax passes (RewriteDataflowReshape) want a root block
            for n, c, i, j, ho in T.grid(N, C, kh, kw, Ho):
                for wo in range(Wo):
                    cols[n, (c * kh + i) * kw + j, ho * Wo + wo] = T.if_then_else(
                        0 <= ho * sh + i * dh - ph and ho * sh + i * dh - ph < H
                        and 0 <= wo * sw + j * dw - pw and wo * sw + j * dw - pw < W,
                        x[n, c, ho * sh + i * dh - ph, wo * sw + j * dw - pw], T.float32(0))

    return im2col.with_attr("global_symbol", name)
