"""Retraining-based evaluation of attribution methods (LDS and counterfactual removal).

Entry point: :func:`diffattr.evaluation.harness.evaluate` (one process or a torchrun group) or
:func:`diffattr.evaluation.harness.launch` (starts the torchrun workers itself).
"""

from __future__ import annotations

from diffattr.evaluation.compare import MethodResult, write_comparison
from diffattr.evaluation.config import EvalConfig, load_eval_config
from diffattr.evaluation.ground_truth import GroundTruth, GroundTruthSpec
from diffattr.evaluation.harness import EvalResult, evaluate, launch
from diffattr.evaluation.lds import LDSResult, lds, spearman
from diffattr.evaluation.subsets import SubsetMasks, make_subsets

__all__ = [
    "EvalConfig",
    "EvalResult",
    "GroundTruth",
    "GroundTruthSpec",
    "LDSResult",
    "MethodResult",
    "SubsetMasks",
    "evaluate",
    "launch",
    "lds",
    "load_eval_config",
    "make_subsets",
    "spearman",
    "write_comparison",
]
