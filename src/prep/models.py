"""The base of prep's config models: true/false is not a number, and a number is not true/false.

pydantic's lax mode reads `true` as 1 for an int field and `1` as true for a bool field, so
`tar_chunk_size: true` wrote shards of one sample and said nothing. A value of the other kind is the
user's mistake, and the config's one-line error names it. (The strings yes/no/on/off still read as
booleans for a bool field: YAML 1.2 keeps them strings, and for such a field they can only mean one
thing.)"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits: unions and Optional unpacked, Annotated unwrapped, a
    Literal as its values' types; `object` for anything else (no check then)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_kinds(a) for a in get_args(annotation)))
    if origin is Literal:
        return {type(v) for v in get_args(annotation)}
    return {annotation} if isinstance(annotation, type) else {object}


class ConfigModel(BaseModel):
    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        kinds = _kinds(field.annotation) if field is not None else {object}
        if object in kinds:
            return value
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise PydanticCustomError("bool_not_number", "expected a number, not true/false")
        only_bool = bool in kinds and kinds <= {bool, type(None)}
        if only_bool and isinstance(value, int | float) and not isinstance(value, bool):
            raise PydanticCustomError("number_not_bool", "expected true or false, not a number")
        return value
