"""retom-jax: Stable Diffusion in JAX/Flax with token merging (ToMe, ReToM, ToDo)."""
from .attention import dot_product_attention
from .weights import CheckpointError

__version__ = "0.1.0"
