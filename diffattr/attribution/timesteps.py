"""Which diffusion timesteps a method differentiates at, and the noise used at each.

Noise is a pure function of its seed parts (via :func:`diffattr.repro.derive_seed`), so an image
gets the same noisy input whatever batch, shard or process it is featurized in. Two policies:

- ``shared`` (D-TRAK's protocol, the default): the noise depends on ``(seed, t, draw)`` only, so
  every sample, training image or query, is noised with the *same* noise at timestep ``t`` (common
  random numbers). Gradients of two images then differ by their content, not by their noise: an
  exact copy of a training image gets exactly that image's features.
- ``per-sample``: the noise also depends on the sample id, ``(seed, id, t, draw)`` (independent
  noise per image; the package's behaviour before the shared policy existed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffattr.repro import derive_seed

TIMESTEP_KINDS = ("uniform", "list", "random")
NOISE_POLICIES = ("shared", "per-sample")


@dataclass
class TimestepPolicy:
    """How to choose ``count`` timesteps out of ``num_train_timesteps``.

    - ``uniform``: ``t_i = t_min + floor(i * (T - t_min) / count)`` for ``i = 0 .. count-1``
      (evenly spaced; with ``t_min = 0`` D-TRAK's ``range(0, T, T // K)`` when ``K`` divides ``T``).
    - ``list``: exactly ``values`` (in the order given).
    - ``random``: ``count`` distinct timesteps in ``[t_min, T)`` drawn without replacement from a
      generator seeded by ``derive_seed(seed, "timesteps")``, sorted ascending.

    ``t_min`` leaves out the smallest timesteps, where the diffusion noise is so small that pixel
    noise in the image changes the gradients (see README, "Near copies").
    """

    kind: str = "uniform"
    count: int = 10
    values: list[int] | None = field(default=None)
    seed: int = 0
    num_train_timesteps: int = 1000
    t_min: int = 0

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
        if (
            isinstance(self.t_min, bool)
            or not isinstance(self.t_min, int)
            or not 0 <= self.t_min < T
        ):
            raise ValueError(f"timesteps.t_min: expected an int in [0, {T}), got {self.t_min!r}")
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
            if self.count > T - self.t_min:
                raise ValueError(
                    f"timesteps.count: {self.count} is more than the {T - self.t_min} training "
                    f"timesteps in [{self.t_min}, {T})"
                )

    def timesteps(self) -> list[int]:
        """The chosen timesteps, each an int in ``[0, num_train_timesteps)``."""
        T = self.num_train_timesteps
        if self.kind == "list":
            return [int(v) for v in self.values or []]
        lo = self.t_min
        if self.kind == "uniform":
            return [lo + (i * (T - lo)) // self.count for i in range(self.count)]
        g = torch.Generator().manual_seed(derive_seed(self.seed, "timesteps"))
        return sorted(lo + int(v) for v in torch.randperm(T - lo, generator=g)[: self.count])


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


def check_noise_policy(policy: str, what: str = "noise") -> None:
    if policy not in NOISE_POLICIES:
        raise ValueError(f"{what}: {policy!r} is unknown; expected one of {NOISE_POLICIES}")


def noise_for(
    seed: int,
    sample_id: int,
    t: int,
    draw: int,
    shape: tuple[int, ...],
    policy: str = "per-sample",
) -> torch.Tensor:
    """Standard normal noise ``shape`` (float32, CPU) that depends only on its arguments.

    Under ``policy="shared"`` it does not depend on ``sample_id`` either (module docstring).
    """
    check_noise_policy(policy)
    if policy == "shared":
        parts: tuple[int | str, ...] = (seed, "shared-noise", int(t), int(draw))
    else:
        parts = (seed, "noise", int(sample_id), int(t), int(draw))
    g = torch.Generator().manual_seed(derive_seed(*parts))
    return torch.randn(tuple(shape), generator=g)
