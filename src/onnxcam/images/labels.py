"""Class labels typed by people: "coffee mug", "Egyptian cat", "cardigan"."""
from __future__ import annotations

import difflib
from typing import Sequence

from ..errors import OnnxcamError


def match_label(text: str, labels: Sequence[str] | None, what: str = "target") -> int:
    """The class index a label names: an exact match first (ImageNet has both "cardigan" and "Cardigan"), then a
    case-insensitive one, then a single label that contains the text as a word ("mug" -> "coffee mug");
    otherwise an error listing the closest labels. A label that names several classes is an error too."""
    if not labels:
        raise OnnxcamError(f"{what} '{text}' is not a class index and the model has no labels")
    wanted = text.strip()
    folded = wanted.casefold()
    for same in (lambda name: name.strip() == wanted, lambda name: name.strip().casefold() == folded):
        found = [i for i, name in enumerate(labels) if same(name)]
        if len(found) == 1:
            return found[0]
        if found:  # ImageNet has two "crane"s, a bird and a machine
            raise OnnxcamError(f"{what} '{text}' names {len(found)} classes ({', '.join(map(str, found))}); "
                               f"pass the class index")
    containing = [i for i, name in enumerate(labels) if folded in name.casefold().replace(",", " ").split()
                  or folded in [part.strip() for part in name.casefold().split(",")]]
    if len(containing) == 1:
        return containing[0]
    candidates = [labels[i] for i in containing][:5] or difflib.get_close_matches(
        wanted, list(labels), n=5, cutoff=0.6) or [n for n in labels if folded in n.casefold()][:5]
    hint = f"; did you mean {', '.join(repr(c) for c in candidates)}?" if candidates else \
        f" (the model has {len(labels)} labels)"
    raise OnnxcamError(f"{what} '{text}' matches no class label{hint}")
