"""Class labels typed by people: "coffee mug", "Egyptian cat", "cardigan"."""
from __future__ import annotations

import difflib
from typing import Sequence

from .errors import OnnxcamError


def match_label(text: str, labels: Sequence[str] | None, what: str = "target") -> int:
    """The class index a label names: an exact match first (ImageNet has both "cardigan" and "Cardigan"), then a
    case-insensitive one, then a single label that contains the text as a word ("mug" -> "coffee mug");
    otherwise an error listing the closest labels."""
    if not labels:
        raise OnnxcamError(f"{what} '{text}' is not a class index and the model has no labels")
    wanted = text.strip()
    for i, name in enumerate(labels):
        if name == wanted:
            return i
    folded = wanted.casefold()
    for i, name in enumerate(labels):
        if name.casefold() == folded:
            return i
    containing = [i for i, name in enumerate(labels) if folded in name.casefold().replace(",", " ").split()
                  or folded in [part.strip() for part in name.casefold().split(",")]]
    if len(containing) == 1:
        return containing[0]
    candidates = [labels[i] for i in containing][:5] or difflib.get_close_matches(
        wanted, list(labels), n=5, cutoff=0.6) or [n for n in labels if folded in n.casefold()][:5]
    hint = f"; did you mean {', '.join(repr(c) for c in candidates)}?" if candidates else ""
    raise OnnxcamError(f"{what} '{text}' matches no class label{hint}")
