"""Input fields as strict as the schema they produce.

DRF's ``CharField`` turns a JSON number or boolean into a string (``5`` -> ``"5"``) while the
OpenAPI schema says ``type: string``; a client sending the wrong type should hear about it.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from rest_framework import serializers


class StrictCharField(serializers.CharField):
    """A ``CharField`` that refuses anything but a JSON string with a 400 (``"Not a valid string."``)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("Not a valid string.", code="invalid")
        return super().to_internal_value(data)


class StrictSlugField(serializers.SlugField):
    """A ``SlugField`` that refuses anything but a JSON string."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("Not a valid string.", code="invalid")
        return super().to_internal_value(data)


class StrictStringsMixin:
    """For ``ModelSerializer``s: text model fields become :class:`StrictCharField`."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.SlugField: StrictSlugField,
    }
