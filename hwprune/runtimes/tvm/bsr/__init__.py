"""Block-sparse layers: BSR packing (:mod:`.bsr`, numpy/scipy only) and TVM kernels (:mod:`.kernels`,
TVM imported inside the functions)."""
