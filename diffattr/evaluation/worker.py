"""Command line of the evaluation: ``python -m diffattr.evaluation.worker --config C --out O``.

Run directly it starts the config's ``workers`` torchrun processes (one torch thread each on CPU);
under torchrun (``torchrun --nproc_per_node W -m diffattr.evaluation.worker ...``) it is one of
them. See :func:`diffattr.evaluation.harness.main` for the options.
"""

from __future__ import annotations

import sys

from diffattr.evaluation.harness import main

if __name__ == "__main__":
    sys.exit(main())
