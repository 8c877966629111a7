"""Where shipped files live: ``configs/`` and ``assets/`` at the repository root.

diffattr is installed editable from its checkout (``make demo`` / ``make test``), so these folders
sit beside the package. A config path given by the user always wins over these defaults.
"""

from __future__ import annotations

from pathlib import Path

from diffattr.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def resource(*parts: str) -> Path:
    """``ROOT/<parts>``, or a clear error when the checkout's shipped file is missing."""
    path = ROOT.joinpath(*parts)
    if not path.exists():
        raise UserError(f"{path}: shipped file missing; is diffattr installed from its checkout?")
    return path


def config_path(path: str | Path | None, default: str) -> Path:
    """The user's config if given, else ``configs/<default>`` from the checkout."""
    if path is not None:
        return Path(path)
    return resource("configs", default)
