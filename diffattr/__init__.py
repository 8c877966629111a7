"""diffattr: which training images made this generated image?

Data attribution for diffusion models: timestep-aware gradient featurizers (TRAK, D-TRAK,
Journey-TRAK, DAS, TracIn family), baselines, and a retraining-based evaluation harness.
"""

__version__ = "0.1.0"
