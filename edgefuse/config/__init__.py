"""Typed, validated configs (pydantic v2, ``extra="forbid"``): one module per stage.

YAML keys equal the field names. Every field is documented once, in its ``Field(description=...)``,
which also ends up in ``export_configs/schema.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefuse.errors import ConfigError


class ConfigValidationError(ConfigError, ValidationError):
    """A bad config value: edgefuse's :class:`~edgefuse.errors.ConfigError` (exit code 2, one line) and still a
    pydantic ``ValidationError`` (its ``errors()`` list every problem).

    Example:
        >>> from edgefuse.config.fusion import FusionConfig
        >>> try:
        ...     FusionConfig(keep_ratio=2)
        ... except ConfigError as e:
        ...     print(e)
        FusionConfig: keep_ratio: 2 is not allowed: Input should be less than or equal to 1
    """

    model: type[BaseModel] | None = None

    @classmethod
    def of(cls, exc: ValidationError, model: type[BaseModel]) -> ConfigValidationError:
        err = cls.from_exception_data(exc.title, exc.errors(include_url=False))  # type: ignore[arg-type]
        err.model = model
        return err

    def __str__(self) -> str:
        from edgefuse.config.messages import validation_message

        model = self.model or StrictModel
        return validation_message(self, model.__name__, model)


class StrictModel(BaseModel):
    """Base of every edgefuse config: unknown keys are errors, values are immutable, and a bad value raises
    :class:`ConfigValidationError` (a :class:`~edgefuse.errors.ConfigError`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ConfigValidationError:
            raise
        except ValidationError as exc:
            raise ConfigValidationError.of(exc, type(self)) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ConfigValidationError:
            raise
        except ValidationError as exc:
            raise ConfigValidationError.of(exc, cls) from None


C = TypeVar("C", bound=StrictModel)


def as_config(cls: type[C], value: C | Mapping[str, Any] | None) -> C:
    """How every API function takes its config: an instance as is, a mapping (e.g. a YAML section) validated
    into ``cls``, None for the defaults. A bad key or value raises :class:`ConfigValidationError`.

    Example:
        >>> from edgefuse.config.profile import ProfileConfig
        >>> as_config(ProfileConfig, {"threads": [1], "runs": 3}).runs
        3
        >>> as_config(ProfileConfig, None).runs
        20
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.model_validate(dict(value))
    raise ConfigError(f"expected a {cls.__name__}, a mapping of its keys or None; got a {type(value).__name__}")
