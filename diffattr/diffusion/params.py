"""Which UNet parameters a job touches: named groups and fnmatch patterns over parameter names.

Shared by the trainers (what a fine-tune updates: a LoRA, the cross-attention keys and values,
everything) and the attribution methods (what is differentiated), so both read ``params`` alike.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from diffattr.errors import OptionError

#: Named parameter groups every gradient method's ``params`` option accepts, by name inside its
#: list or alone (``params=lora``): fnmatch patterns over the UNet's parameter names, of which a
#: model need only have some (a LoRA-wrapped layer's weight is ``<layer>.base_layer.weight``).
#: ``lora``: peft's LoRA matrices (D-TRAK's ArtBench setting: gradients of the LoRA only);
#: ``cross-attn-kv``: the key and value projections of cross-attention, the text's entry into the
#: UNet (attribution by unlearning's subset); ``all``: every parameter.
PARAM_GROUPS: dict[str, list[str] | None] = {
    "all": None,
    "lora": ["*.lora_A.*", "*.lora_B.*"],
    "cross-attn-kv": [
        f"*attn2.{proj}.{part}"
        for proj in ("to_k", "to_v")
        for part in ("weight", "bias", "base_layer.weight", "base_layer.bias")
    ],
}


def fine_tuned_params(model: Any) -> str | list[str] | None:
    """What a fine-tune of ``model`` changed, as a ``params`` value: ``"lora"`` when a LoRA is
    loaded on its UNet; for a pipeline folder written by the fine-tuning trainer with ``tune``
    other than ``lora`` (a group name or patterns), that ``tune``; None for any other model (not
    a fine-tune, or nothing recorded)."""
    from diffattr.repro import read_record

    if any(".lora_A." in n for n, _ in model.unet.named_parameters()):
        return "lora"
    folder = getattr(model, "base_path", None)
    if folder is None or not (Path(folder) / "diffattr.json").is_file():
        return None
    try:
        tune = read_record(folder).get("tune")
    except (OSError, ValueError):
        return None
    if isinstance(tune, str) or (isinstance(tune, list) and tune):
        return tune
    return None


def select_params(
    unet: nn.Module, patterns: list[str] | str | None = None, presets: Iterable[str] = ()
) -> dict[str, nn.Parameter]:
    """Parameters of ``unet`` whose name matches any of the fnmatch ``patterns`` (all if None).

    An entry of ``patterns`` may name a group of :data:`PARAM_GROUPS` (``"lora"``,
    ``"cross-attn-kv"``, ``"all"``), which stands for its patterns. Order follows
    ``unet.named_parameters()``. Raises :class:`~diffattr.errors.OptionError` (a ``ValueError``;
    the CLI prints it as one line) naming every pattern, or group, that matches no parameter (a
    typo would otherwise silently drop a layer), with example names, the top-level groups and
    ``presets``, the named groups the calling method also accepts.
    """
    named = dict(unet.named_parameters())
    if patterns is None:
        return named
    if isinstance(patterns, str):
        patterns = [patterns]
    if len(patterns) == 0:
        raise OptionError("params: empty pattern list; use None to select every parameter")
    if any(PARAM_GROUPS.get(p, []) is None for p in patterns):  # "all"
        return named

    def matches(name: str, entry: str) -> bool:
        group = PARAM_GROUPS.get(entry)
        pats = [entry] if group is None else group
        return any(fnmatch.fnmatchcase(name, pat) for pat in pats)

    bad = [entry for entry in patterns if not any(matches(n, entry) for n in named)]
    if bad:
        raise OptionError(
            _no_match_message(
                bad, list(named), [*presets, *(g for g in PARAM_GROUPS if g not in presets)]
            )
        )
    return {name: p for name, p in named.items() if any(matches(name, e) for e in patterns)}


def _no_match_message(bad: list[str], names: list[str], presets: list[str]) -> str:
    """``params``: which patterns matched nothing, and what the model's names look like."""
    which = ", ".join(repr(p) for p in bad)
    first: dict[str, str] = {}  # top-level group -> its first parameter name
    for n in names:
        first.setdefault(n.split(".", 1)[0] + (".*" if "." in n else ""), n)
    text = (
        f"params: {'pattern' if len(bad) == 1 else 'patterns'} {which} "
        f"{'matches' if len(bad) == 1 else 'match'} no parameter of the model; patterns are "
        f"fnmatch over its {len(names)} parameter names, e.g. {', '.join(list(first.values())[:3])}"
        f"; top-level groups: {', '.join(first)}"
    )
    if presets:
        text += f"; or a named group instead of a list (params=NAME): {', '.join(presets)}"
    return text
