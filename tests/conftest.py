import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare float32 results with torch: never let a GPU use TF32 for them.
# (CPU float32 dots are exact already, and CPU has no "highest" half-precision dot.)
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
