"""``python -m seqnorm_jax``: the ``seqnorm-jax`` command line (see :mod:`seqnorm_jax.cli`)."""

import sys

from seqnorm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
