"""D-TRAK (Zheng et al. 2024, "Intriguing Properties of Data Attribution on Diffusion Models").

Same pipeline as TRAK, but the features are gradients of an output function that is *not* the
training loss; the paper's best is ``square``: ``mean_pixels eps_theta(x_t, t)^2``. The same output
is used for training and query features. Any output of :data:`diffattr.attribution.outputs.OUTPUTS`
can be chosen with ``output``.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffattr.attribution.methods.trak import TrakKernelAttributor, TrakOptions
from diffattr.attribution.outputs import OUTPUTS


@dataclass
class DTrakOptions(TrakOptions):
    """``output``: name of the output function (default ``square``, D-TRAK's best)."""

    output: str = "square"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output not in OUTPUTS:
            raise ValueError(
                f"output: {self.output!r} is unknown; expected one of {sorted(OUTPUTS)}"
            )


class DTrak(TrakKernelAttributor):
    """``d-trak``: TRAK kernel on gradients of ``options.output``."""

    name: str = "d-trak"

    def output_name(self) -> str:
        return str(self.options.output)
