"""Fail loudly if the virtual environment is in a state known to break diffattr.

Measured on the CPU machines this project targets: open_clip_torch pulls in torchvision, no
torchvision build matches the CPU torch wheel, and once it is installed ``from diffusers import
UNet2DModel`` dies with "operator torchvision::nms does not exist". Catch that at install time
with a message that says what to do, not deep inside the first training run.
"""

from __future__ import annotations

import importlib.util
import sys


def main() -> int:
    problems: list[str] = []
    try:
        import torch
    except Exception as exc:  # pragma: no cover - reported to the user
        print(f"check_env: torch does not import: {exc}", file=sys.stderr)
        return 1
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
            from diffusers import UNet2DModel  # noqa: F401
        except Exception as exc:
            problems.append(
                "torchvision is installed but broken against torch "
                f"{torch.__version__} ({exc}). Uninstall it (pip uninstall torchvision "
                "open_clip_torch timm) or install a torchvision built for this torch."
            )
    try:
        from diffusers import UNet2DModel  # noqa: F401
    except Exception as exc:
        problems.append(f"diffusers does not import: {exc}")
    for problem in problems:
        print(f"check_env: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_env: ok (torch {torch.__version__})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
