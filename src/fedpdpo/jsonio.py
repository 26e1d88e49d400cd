"""Strict JSON for every file and line fedpdpo writes.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no other JSON parser accepts (``jq``, browsers,
pandas' strict mode): a diverged metric would make a whole summary unreadable elsewhere. Non-finite floats are
written as ``null`` instead, and ``allow_nan=False`` makes any that slip through an error rather than bad output.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, recursively through dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that only ever produces standard JSON (non-finite floats become null)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
