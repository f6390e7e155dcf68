"""runtimes/tvm."""
