"""What the models stand on: the JSON value type, the hard limits and the validating base model.

Pure, no I/O. :mod:`kaiju_tasks.stages` (the stage kinds and their command models) and
:mod:`kaiju_tasks.models` (tasks, which hold stages) both build on it, so it sits below them.
"""

from __future__ import annotations

import enum
from typing import Any, TypeAlias

import pydantic

JSONValue: TypeAlias = pydantic.JsonValue
"""Any JSON value: dict, list, str, int, float, bool or None (recursively)."""


class Limit(enum.IntEnum):
    """Hard limits, checked at create and update (seconds for the ``*_T`` members)."""

    MAX_STAGES = 100
    MAX_RETRIES = 10
    MIN_T = 10
    DEFAULT_T = 300
    MAX_T = 14400


class Model(pydantic.BaseModel):
    """Raises :class:`errors.ValidationError` (naming the field) when built from bad data."""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            # The translation knows every model's fields and the stage kinds' union tags, so it
            # lives above both (in models); by the time a model is built, models is loaded.
            from kaiju_tasks import models

            raise models.validation_error(exc) from None

    # Tell pydantic this __init__ only wraps its own: models nested in another are then
    # validated inside pydantic-core, without a Python call each (bulk creates validate tens
    # of thousands), and only the outermost model translates, with full error locations.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]
