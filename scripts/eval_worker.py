"""One process of a multi-process evaluation; launch with torchrun, e.g.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/eval_worker.py \
        --config configs/eval/digits2-smoke.yaml --out runs/eval-smoke --methods pixel,trak

Each process joins the torchrun group through accelerate's ``PartialState``; see
``diffattr.evaluation.harness`` for how the stages are shared.
"""

from __future__ import annotations

import sys

from diffattr.evaluation.harness import main

if __name__ == "__main__":
    sys.exit(main())
