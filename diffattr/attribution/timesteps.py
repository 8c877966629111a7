"""Which diffusion timesteps a method differentiates at, and the noise used at each.

Noise is a pure function of ``(seed, sample id, t, draw)`` (via :func:`diffattr.repro.derive_seed`)
so a training image gets the same noisy input whatever batch, shard or process it is featurized in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffattr.repro import derive_seed

TIMESTEP_KINDS = ("uniform", "list", "random")


@dataclass
class TimestepPolicy:
    """How to choose ``count`` timesteps out of ``num_train_timesteps``.

    - ``uniform``: ``t_i = floor(i * T / count)`` for ``i = 0 .. count-1`` (evenly spaced from 0,
      as D-TRAK's ``range(0, T, T // K)`` when ``K`` divides ``T``).
    - ``list``: exactly ``values`` (in the order given).
    - ``random``: ``count`` distinct timesteps drawn without replacement from a generator seeded by
      ``derive_seed(seed, "timesteps")``, sorted ascending.
    """

    kind: str = "uniform"
    count: int = 10
    values: list[int] | None = field(default=None)
    seed: int = 0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        T = self.num_train_timesteps
        if self.kind not in TIMESTEP_KINDS:
            raise ValueError(
                f"timesteps.kind: {self.kind!r} is unknown; expected one of {TIMESTEP_KINDS}"
            )
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"timesteps.num_train_timesteps: expected an int >= 1, got {T!r}")
        if self.kind == "list":
            if not self.values:
                raise ValueError(
                    "timesteps.values: kind 'list' needs a non-empty list of timesteps"
                )
            validate_timesteps(list(self.values), T, "timesteps.values")
            if len(set(self.values)) != len(self.values):
                raise ValueError(f"timesteps.values: duplicate timesteps in {list(self.values)}")
        else:
            if not isinstance(self.count, int) or self.count < 1:
                raise ValueError(f"timesteps.count: expected an int >= 1, got {self.count!r}")
            if self.count > T:
                raise ValueError(
                    f"timesteps.count: {self.count} is more than the {T} training timesteps"
                )

    def timesteps(self) -> list[int]:
        """The chosen timesteps, each an int in ``[0, num_train_timesteps)``."""
        T = self.num_train_timesteps
        if self.kind == "list":
            return [int(v) for v in self.values or []]
        if self.kind == "uniform":
            return [(i * T) // self.count for i in range(self.count)]
        g = torch.Generator().manual_seed(derive_seed(self.seed, "timesteps"))
        return sorted(int(v) for v in torch.randperm(T, generator=g)[: self.count])


def validate_timesteps(
    values: list[int], num_train_timesteps: int, what: str = "timesteps"
) -> None:
    """Raise ``ValueError`` naming ``what`` unless every value is an int in ``[0, T)``."""
    if len(values) == 0:
        raise ValueError(f"{what}: need at least one timestep")
    for v in values:
        if isinstance(v, bool) or int(v) != v or not 0 <= int(v) < num_train_timesteps:
            raise ValueError(
                f"{what}: timestep {v!r} is not an integer in [0, {num_train_timesteps})"
            )


def noise_for(seed: int, sample_id: int, t: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise ``shape`` (float32, CPU) that depends only on its arguments."""
    g = torch.Generator().manual_seed(derive_seed(seed, "noise", int(sample_id), int(t), int(draw)))
    return torch.randn(tuple(shape), generator=g)
