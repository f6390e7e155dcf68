"""Exporters: turn a (sliced) model into an artifact for the target's runtime.

The formats ``hwprune export --format`` knows, by name (the CLI's choices; their writers are
registered in :data:`hwprune.export.artifacts.FORMATS`): ``onnx`` (the sliced dense model),
``npz`` (scipy BSR/CSR weights of a block run), ``tvm`` (a TVM library with BSR kernels).
"""

FORMAT_NAMES = ("onnx", "npz", "tvm")
