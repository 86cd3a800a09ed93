"""The served spec's schemas of /v1/responses (OpenAI's Responses API, text; see
`router/responses_route.py`), from the request's and the answer's models."""

from __future__ import annotations

from typing import Any

from shardline.router.schemas.common import openapi_components
from shardline.router.schemas.openai import inlined
from shardline.router.schemas.responses import RESPONSES_REQUEST_MODELS
from shardline.router.schemas.responses_answer import RESPONSES_ANSWER_MODELS

_MODELS = {**RESPONSES_REQUEST_MODELS, **RESPONSES_ANSWER_MODELS}
# The components the spec names; the models they hold are written out in place.
_PUBLISHED = {*_MODELS, "ResponsesInputMessage"}


def responses_schemas() -> dict[str, Any]:
    components = openapi_components(_MODELS)
    nested = {name: schema for name, schema in components.items() if name not in _PUBLISHED}
    return {name: inlined(components[name], nested) for name in components if name in _PUBLISHED}
