"""A model's feature spec and the per-request builder of its input vector.

The spec ships with each model (`<model>.spec.json`). It is validated once when the model is
loaded, and everything a request needs (split source paths, vocabulary dictionaries, bounds) is
precomputed then, so `build_row` is a single loop of dict lookups, type checks and comparisons.

Spec shape (spec_version 1):

    {"spec_version": 1, "name": ..., "product": ..., "input_name": "features",
     "output_name": "probabilities", "positive_class_index": 1, "threshold": 0.42,
     "features": [
       {"name": "amount", "source": "amount", "type": "numeric", "required": true,
        "min": 0, "max": 10000000, "baseline": 45.0},
       {"name": "currency", "source": "currency", "type": "categorical", "required": true,
        "normalize": "upper", "vocabulary": ["USD", ..., "__other__"],
        "default_bucket": "__other__", "baseline": "USD"},
       {"name": "hour_of_day", "source": "features.hour_of_day", "type": "numeric",
        "required": false, "integer": true, "min": 0, "max": 23, "default": 12, "baseline": 12}]}

`source` is a dotted path inside the request's `payload`. A categorical value is encoded as the
float index of its (normalized) value in `vocabulary`; unknown values take the index of
`default_bucket`, which must be the last entry. `baseline` is a typical legitimate value, the
reference of explanations. Top-level keys beyond these are ignored; unknown keys inside a feature
are rejected, because a misspelt "maximum" would silently drop a bound.

Request rules: a missing (or null) optional value takes its default, a missing required one is an
error; numbers must be JSON numbers (not booleans, not strings) that are finite and within
[min, max], and integral where `integer` is set; categorical values must be strings of at most
64 characters. Only the first error is reported.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np

from app.errors import FeatureValidationFailed

SPEC_VERSION = 1
MAX_CATEGORY_LENGTH = 64
FLOAT32_MAX = float(np.finfo(np.float32).max)
REVIEW_FACTOR = 0.7

_NUMERIC, _CATEGORICAL = 0, 1
_ABSENT: dict = {}  # stands for a nested object the payload does not have; never written to
_TYPES = {"numeric": _NUMERIC, "categorical": _CATEGORICAL}
_NORMALIZERS = {None: None, "upper": str.upper, "lower": str.lower}
_COMMON_KEYS = {"name", "source", "type", "required", "default", "baseline"}
_FEATURE_KEYS = {
    "numeric": _COMMON_KEYS | {"min", "max", "integer"},
    "categorical": _COMMON_KEYS | {"vocabulary", "default_bucket", "normalize"},
}


def decide(score: float, threshold: float) -> str:
    """The decision of the API contract: block at the threshold, review from 70% of it."""
    if score >= threshold:
        return "block"
    if score >= threshold * REVIEW_FACTOR:
        return "review"
    return "allow"


def load_spec(path: str | os.PathLike) -> FeatureSpec:
    """Reads and validates a spec file."""
    with open(path, "rb") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"feature spec {os.fspath(path)}: not valid JSON: {exc}") from None
    return FeatureSpec.from_dict(data)


class Feature:
    """One validated feature of a spec, with what `build_row` needs precomputed."""

    __slots__ = ("name", "source", "field", "kind", "required", "lo", "hi", "integer",
                 "vocabulary", "index", "default_index", "normalize", "default", "baseline",
                 "container", "key")

    def __init__(self, position: int, d: Any):
        where = f"features[{position}]"
        if not isinstance(d, dict):
            raise ValueError(f"feature spec: {where} must be an object")
        self.name = _text(d.get("name"), f"{where}.name")
        where = f"features[{position}] ({self.name})"
        kind_name = d.get("type")
        if kind_name not in _TYPES:
            raise ValueError(f"feature spec: {where}: unknown type {kind_name!r}, "
                             f"expected one of {sorted(_TYPES)}")
        unknown = set(d) - _FEATURE_KEYS[kind_name]
        if unknown:
            raise ValueError(f"feature spec: {where}: unknown keys {sorted(unknown)}")
        self.kind = _TYPES[kind_name]
        self.source = _text(d.get("source"), f"{where}.source")
        if any(part == "" for part in self.source.split(".")):
            raise ValueError(f"feature spec: {where}: bad source path {self.source!r}")
        self.field = "payload." + self.source
        self.required = d.get("required")
        if not isinstance(self.required, bool):
            raise ValueError(f"feature spec: {where}: 'required' must be true or false")
        self.lo = self.hi = None
        self.integer = False
        self.vocabulary: list[str] = []
        self.index: dict[str, int] = {}
        self.default_index = -1
        self.normalize = None
        if self.kind == _NUMERIC:
            self._init_numeric(d, where)
        else:
            self._init_categorical(d, where)
        if "default" in d and self.required:
            raise ValueError(f"feature spec: {where}: a required feature has no default")
        if not self.required and "default" not in d:
            raise ValueError(f"feature spec: {where}: an optional feature needs a default")
        self.default = self.encode_spec_value(d["default"], f"{where}.default") \
            if "default" in d else None
        if "baseline" not in d:
            raise ValueError(f"feature spec: {where}: missing baseline")
        self.baseline = self.encode_spec_value(d["baseline"], f"{where}.baseline")
        self.container = 0  # set by FeatureSpec: index of the object that holds `key`
        self.key = self.source.rsplit(".", 1)[-1]

    def _init_numeric(self, d: dict, where: str) -> None:
        """Bounds default to the float32 range, so a finite check is one chained comparison."""
        self.lo = _number(d.get("min", -FLOAT32_MAX), f"{where}.min")
        self.hi = _number(d.get("max", FLOAT32_MAX), f"{where}.max")
        if self.lo > self.hi:
            raise ValueError(f"feature spec: {where}: min {self.lo} > max {self.hi}")
        if abs(self.lo) > FLOAT32_MAX or abs(self.hi) > FLOAT32_MAX:
            raise ValueError(f"feature spec: {where}: bounds beyond the float32 range")
        self.integer = d.get("integer", False)
        if not isinstance(self.integer, bool):
            raise ValueError(f"feature spec: {where}: 'integer' must be true or false")

    def _init_categorical(self, d: dict, where: str) -> None:
        """Vocabulary as value -> index, the default bucket last, entries already normalized."""
        normalize = d.get("normalize")
        if normalize not in _NORMALIZERS:
            raise ValueError(f"feature spec: {where}: normalize must be 'upper', 'lower' or "
                             f"absent, not {normalize!r}")
        self.normalize = _NORMALIZERS[normalize]
        vocabulary = d.get("vocabulary")
        if not isinstance(vocabulary, list) or not vocabulary:
            raise ValueError(f"feature spec: {where}: missing or empty vocabulary")
        for value in vocabulary:
            if not isinstance(value, str) or not value or len(value) > MAX_CATEGORY_LENGTH:
                raise ValueError(f"feature spec: {where}: vocabulary entries must be strings of "
                                 f"1 to {MAX_CATEGORY_LENGTH} characters, got {value!r}")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"feature spec: {where}: duplicate vocabulary entries")
        bucket = d.get("default_bucket")
        if not isinstance(bucket, str) or not bucket:
            raise ValueError(f"feature spec: {where}: missing default_bucket")
        if vocabulary[-1] != bucket:
            raise ValueError(f"feature spec: {where}: default_bucket {bucket!r} must be the "
                             f"last vocabulary entry")
        if self.normalize is not None:
            for value in vocabulary[:-1]:
                if self.normalize(value) != value:
                    raise ValueError(f"feature spec: {where}: vocabulary entry {value!r} is not "
                                     f"{normalize}-case, so no request could match it")
        self.vocabulary = list(vocabulary)
        self.index = {value: i for i, value in enumerate(vocabulary)}
        self.default_index = len(vocabulary) - 1

    def encode_spec_value(self, value: Any, where: str) -> float:
        """A default or baseline from the spec as the float the model sees; it must be valid."""
        if self.kind == _CATEGORICAL:
            if value not in self.index:
                raise ValueError(f"feature spec: {where}: {value!r} is not in the vocabulary")
            return float(self.index[value])
        number = _number(value, where)
        if not self.lo <= number <= self.hi:
            raise ValueError(f"feature spec: {where}: {value!r} outside [{self.lo}, {self.hi}]")
        if self.integer and not float(number).is_integer():
            raise ValueError(f"feature spec: {where}: {value!r} is not an integer")
        return float(number)


class FeatureSpec:
    """A validated spec: names, threshold, output wiring, and the builder of input rows."""

    def __init__(self, raw: dict, features: list[Feature]):
        self.raw = raw
        self.name: str = raw["name"]
        self.product: str = raw["product"]
        self.input_name: str = raw["input_name"]
        self.output_name: str = raw["output_name"]
        self.positive_class_index: int = raw["positive_class_index"]
        self.threshold = float(raw["threshold"])
        self.features = tuple(features)
        self.names = tuple(f.name for f in features)
        self._containers = _container_steps(features)
        self._baseline = np.array([f.baseline for f in features], dtype=np.float32)
        self._baseline.flags.writeable = False
        # Packing the Python floats straight into the buffer: half the cost of out[:] = list.
        self._pack_into = struct.Struct(f"={len(features)}f").pack_into
        # One tuple per feature, unpacked in the hot loop (cheaper than attribute lookups).
        self._plan = tuple(
            (f.container, f.key, f.kind == _NUMERIC, f.required, f.default, f.lo, f.hi, f.integer,
             f.index, f.default_index, f.normalize, f)
            for f in features
        )

    @classmethod
    def from_dict(cls, d: Any) -> FeatureSpec:
        """Validates a parsed spec; raises ValueError naming the first problem."""
        if not isinstance(d, dict):
            raise ValueError("feature spec: must be a JSON object")
        if d.get("spec_version") != SPEC_VERSION:
            raise ValueError(f"feature spec: spec_version must be {SPEC_VERSION}, "
                             f"got {d.get('spec_version')!r}")
        for key in ("name", "product", "input_name", "output_name"):
            _text(d.get(key), key)
        index = d.get("positive_class_index")
        if type(index) is not int or index < 0:
            raise ValueError("feature spec: positive_class_index must be an integer >= 0")
        threshold = d.get("threshold")
        if not _is_number(threshold) or not 0 < threshold <= 1:
            raise ValueError(f"feature spec: threshold must be a number in (0, 1], "
                             f"got {threshold!r}")
        entries = d.get("features")
        if not isinstance(entries, list) or not entries:
            raise ValueError("feature spec: features must be a non-empty list")
        features = [Feature(i, entry) for i, entry in enumerate(entries)]
        _check_unique(features)
        return cls(d, features)

    def __len__(self) -> int:
        return len(self.features)

    def __repr__(self) -> str:
        return f"<FeatureSpec {self.name} product={self.product} features={len(self)}>"

    def baseline_row(self) -> np.ndarray:
        """The typical legitimate event as a model row (a fresh copy the caller may change)."""
        return self._baseline.copy()

    def build_row(self, payload: Any, out: np.ndarray) -> None:
        """Fills `out` (C-contiguous float32, length F); raises FeatureValidationFailed."""
        if type(payload) is not dict:
            raise _failure("payload", "not_an_object", "payload must be a JSON object")
        containers = [payload]
        for parent, key, field in self._containers:
            child = containers[parent].get(key)
            if child is None:
                child = _ABSENT
            elif type(child) is not dict:
                raise _failure(field, "not_an_object", f"{field} must be a JSON object")
            containers.append(child)
        values = []
        append = values.append
        for (container, key, numeric, required, default, lo, hi, integer, index, default_index,
             normalize, feature) in self._plan:
            value = containers[container].get(key)
            if value is None:
                if required:
                    raise _failure(feature.field, "missing", f"{feature.field} is required")
                append(default)
            elif numeric:
                kind_of = type(value)
                if kind_of is not float and kind_of is not int:
                    raise _not_a_number(feature, value)
                if not lo <= value <= hi:
                    raise _out_of_range(feature, value)
                if integer and kind_of is float and not value.is_integer():
                    raise _failure(feature.field, "not_an_integer",
                                   f"{feature.field} must be an integer", value=value)
                append(value)
            else:
                if type(value) is not str:
                    raise _failure(feature.field, "not_a_string",
                                   f"{feature.field} must be a string", got=_json_type(value))
                if len(value) > MAX_CATEGORY_LENGTH:
                    raise _failure(feature.field, "too_long",
                                   f"{feature.field} is longer than {MAX_CATEGORY_LENGTH} "
                                   f"characters", max_length=MAX_CATEGORY_LENGTH)
                if normalize is not None:
                    value = normalize(value)
                append(index.get(value, default_index))
        self._pack_into(out, 0, *values)


def _container_steps(features: list[Feature]) -> tuple:
    """Resolution plan of the nested objects: (parent index, key, field path), parents first."""
    positions = {(): 0}
    steps = []
    for feature in features:
        parts = tuple(feature.source.split("."))
        for depth in range(1, len(parts)):
            path = parts[:depth]
            if path not in positions:
                positions[path] = len(positions)
                steps.append((positions[path[:-1]], path[-1], "payload." + ".".join(path)))
        feature.container = positions[parts[:-1]]
    return tuple(steps)


def _check_unique(features: list[Feature]) -> None:
    """No two features share a name or a source, and no source is the parent of another."""
    names, sources = set(), set()
    for f in features:
        if f.name in names:
            raise ValueError(f"feature spec: duplicate feature name {f.name!r}")
        if f.source in sources:
            raise ValueError(f"feature spec: duplicate source {f.source!r}")
        names.add(f.name)
        sources.add(f.source)
    for f in features:
        parts = f.source.split(".")
        for depth in range(1, len(parts)):
            if ".".join(parts[:depth]) in sources:
                raise ValueError(f"feature spec: source {f.source!r} is nested inside the "
                                 f"source of another feature")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"feature spec: {where} must be a non-empty string")
    return value


def _is_number(value: Any) -> bool:
    """A JSON number that is finite: int or float, never bool."""
    if type(value) is int:
        return True
    return type(value) is float and math.isfinite(value)


def _number(value: Any, where: str) -> float:
    if not _is_number(value):
        raise ValueError(f"feature spec: {where} must be a finite number, got {value!r}")
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for error details."""
    return {bool: "boolean", str: "string", int: "number", float: "number", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _failure(field: str, reason: str, message: str, **details: Any) -> FeatureValidationFailed:
    return FeatureValidationFailed(message, details={"field": field, "reason": reason, **details})


def _not_a_number(feature: Feature, value: Any) -> FeatureValidationFailed:
    return _failure(feature.field, "not_a_number", f"{feature.field} must be a number",
                    got=_json_type(value))


def _out_of_range(feature: Feature, value: float) -> FeatureValidationFailed:
    """NaN and infinities fail the range comparison too; they get their own reason."""
    if type(value) is float and not math.isfinite(value):
        return _failure(feature.field, "not_finite", f"{feature.field} must be a finite number")
    return _failure(feature.field, "out_of_range",
                    f"{feature.field} must be between {_plain(feature.lo)} and "
                    f"{_plain(feature.hi)}", min=_plain(feature.lo), max=_plain(feature.hi))


def _plain(number: float) -> int | float:
    """12.0 -> 12 in messages and details."""
    return int(number) if float(number).is_integer() and abs(number) < 2**53 else number
