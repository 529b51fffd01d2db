"""Compile-only analysis of retom-jax's programs: XLA's counts on the host (``cost``) and
TPU compiles from a CPU host (``tpu``, with its roofline model in ``roofline``)."""
