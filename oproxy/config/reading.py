"""
Reading a YAML tree into the schema, with cattrs, and saying where it is wrong.

The converter follows the field types of :mod:`oproxy.config.schema`: a
section is a frozen class, a list a ``tuple[X, ...]``, and a value whose
type is ``Annotated`` with a conversion from :mod:`oproxy.config.values` is
converted by it.  What the file spells differently is said on the field
(:class:`~oproxy.config.values.FileKey`), not here.

Strictness is the point: unknown keys are errors (a typo that is silently
ignored is a security hole in a gateway), and a value left empty
(``key:`` alone, or ``null``) means the default, as it always has.  cattrs
collects every problem with the attribute or index it was found at;
:func:`explain` turns the first into a :class:`ConfigError` whose key is
the path in the file (``backends[0].url``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, override

from oproxy.config.schema import APIKey, ListedKey
from oproxy.config.values import (
    ConfigError,
    FileKey,
    boolean,
    items,
    limits,
    mapping,
    string,
)
from oproxy.security.policy import Limits

T = TypeVar("T")

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def structure(data: Any, cl: type[T]) -> T:
    """
    ``data`` read as a ``cl``; else the first problem, its key relative to ``data``.
    """
    try:
        return _converter.structure(data, cl)
    except (ConfigError, ClassValidationError) as e:
        raise explain(e) from None


def explain(error: Exception) -> ConfigError:
    """
    The first problem cattrs found, as a :class:`ConfigError` naming its key.

    The attributes of a section are read in the order the schema lists
    them, and unknown keys are looked for last, so the first problem is the
    one a reader of the file meets first.  Anything that is not a problem
    with the file (a bug) is raised as it is.
    """
    if isinstance(error, ConfigError):
        return error
    if not isinstance(error, ClassValidationError):
        raise error
    first = error.exceptions[0]
    if isinstance(first, ForbiddenExtraKeysError):
        return ConfigError(sorted(str(k) for k in first.extra_fields)[0], "is not a known setting")
    notes = [n for n in getattr(first, "__notes__", ()) if isinstance(n, AttributeValidationNote)]
    if not notes:
        return explain(first)
    key = _file_key(notes[-1].name, notes[-1].type)
    if isinstance(first, KeyError):
        return ConfigError(key, "is required")
    return explain(first).within(key)


def _metadata(t: Any) -> tuple[Any, ...]:
    return t.__metadata__ if get_origin(t) is Annotated else ()


def _file_key(name: str, t: Any) -> str:
    for mark in _metadata(t):
        if isinstance(mark, FileKey) and mark.key is not None:
            return mark.key
    return name


def _conversion(t: Any) -> Callable[[Any], Any] | None:
    for mark in _metadata(t):
        if callable(mark):
            return mark  # type: ignore[no-any-return]
    return None


def _converted(t: Any) -> Callable[[Any, Any], Any]:
    convert = _conversion(t)
    assert convert is not None
    return lambda value, _: convert(value)


def _is_list(t: Any) -> bool:
    args = get_args(t)
    return get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _list_of(t: Any) -> Callable[[Any, Any], tuple[Any, ...]]:
    element = get_args(t)[0]

    def one(item: Any) -> Any:
        return structure(item, element)

    return lambda value, _: items(value, one)


def _section_of(cl: type[Any]) -> Callable[[Any, Any], Any]:
    """
    The hook for a section: a mapping read into ``cl``, strictly.

    Fields marked with a :class:`FileKey` are read from that key instead,
    possibly inside a subsection (``circuit_breaker.failures``), whose keys
    are lifted into this mapping first, so that unknown ones are refused
    like any other and named with their whole path.
    """
    overrides: dict[str, Any] = {}
    known = set()
    for field in attrs.fields(attrs.resolve_types(cl)):
        mark = next((m for m in _metadata(field.type) if isinstance(m, FileKey)), None)
        if mark is None:
            known.add(field.name)
        elif mark.key is None:
            overrides[field.name] = override(omit=True)
        else:
            overrides[field.name] = override(rename=mark.key)
            known.add(mark.key)
    subsections = {k.split(".", 1)[0] for k in known if "." in k}
    generated = make_dict_structure_fn(cl, _converter, _cattrs_use_linecache=False, **overrides)

    def section(value: Any, _: Any) -> Any:
        given = mapping({} if value is None else value)
        for spelt in (k for k in given if "." in k and k in known):
            raise ConfigError(spelt, "is not a known setting")  # only nested, as documented
        for name in subsections & given.keys():
            inner = given.pop(name)
            try:
                inner = mapping({} if inner is None else inner)
            except ConfigError as e:
                raise e.within(name) from None
            given.update({f"{name}.{k}": v for k, v in inner.items()})
        # A key left empty means its default; an unknown one is still refused.
        return generated({k: v for k, v in given.items() if v is not None or k not in known}, cl)

    return section


def _api_key(value: Any, _: Any) -> APIKey:
    return structure(value, ListedKey).api_key()


_converter.register_structure_hook(str, lambda value, _: string(value))
_converter.register_structure_hook(bool, lambda value, _: boolean(value))
_converter.register_structure_hook(Limits, lambda value, _: limits(value))
_converter.register_structure_hook_factory(_is_list, _list_of)
_converter.register_structure_hook_factory(lambda t: _conversion(t) is not None, _converted)
_converter.register_structure_hook_factory(attrs.has, _section_of)
_converter.register_structure_hook(APIKey, _api_key)
