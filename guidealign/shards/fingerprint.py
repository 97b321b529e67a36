"""Fingerprints: a stable hash of a stage's config and of what it read."""
from __future__ import annotations

import dataclasses
import hashlib
import json


def _plain(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def _default(obj):
    """JSON for what json cannot write: a set as its sorted items (its iteration order, and
    so str(), changes with PYTHONHASHSEED from one process to the next), the rest as str()."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=lambda x: json.dumps(x, sort_keys=True, default=_default))
    return str(obj)


def fingerprint(*parts) -> str:
    """Hash any JSON-able parts (dataclasses are converted) into a short hex digest."""
    blob = json.dumps([_plain(p) for p in parts], sort_keys=True, default=_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def at_defaults(section, keys) -> dict:
    """A config section (dataclass) as a dict with ``keys`` (settings that do not change the
    output) at their defaults: changing them changes no fingerprint, and a run with the
    defaults keeps the fingerprint it had when they counted (no rebuild after an upgrade)."""
    blank = dataclasses.asdict(type(section)())  # nested sections as dicts, as asdict gives them
    return {k: (blank[k] if k in keys else v) for k, v in dataclasses.asdict(section).items()}
