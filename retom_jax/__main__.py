"""``python -m retom_jax ...`` runs the ``retom-jax`` command line."""
import sys

from .cli import main

sys.exit(main())
