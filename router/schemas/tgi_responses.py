"""TGI's answers, as `/openapi.json` describes them (router/server.py writes them): which fields
are required, nullable and their types are TGI's."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, Field, RootModel

from shardline.router.schemas.common import ErrorResponse

Count = Annotated[int, Field(ge=0, json_schema_extra={"format": "int32"})]
TokenId = Annotated[int, Field(ge=0, json_schema_extra={"format": "int32"})]
Seed = Annotated[int, Field(ge=0, json_schema_extra={"format": "int64"})]
Logprob = Annotated[float, Field(json_schema_extra={"format": "float"})]


class FinishReason(str, Enum):
    length = "length"
    eos_token = "eos_token"
    stop_sequence = "stop_sequence"


class PrefillToken(BaseModel):
    id: TokenId
    text: str
    logprob: Logprob | None


class Token(PrefillToken):
    special: bool


class SimpleToken(BaseModel):
    id: TokenId
    text: str
    start: Count
    stop: Count


class TokenizeResponse(RootModel[list[SimpleToken]]):
    pass


class _Generation(BaseModel):
    finish_reason: FinishReason
    generated_tokens: Count
    seed: Seed | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = []


class BestOfSequence(_Generation):
    generated_text: str


class Details(_Generation):
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: Count
    input_length: Count
    seed: Seed | None = None


class StreamResponse(BaseModel):
    index: Count
    token: Token
    top_tokens: list[Token] = []
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    """`/info`: the model and the server's limits."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = None
    quantize: str | None = None  # the weights' FP8 format (TGI's --quantize); null: unquantized
    kv_cache_dtype: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: Count
    max_best_of: Count
    max_stop_sequences: Count
    max_input_tokens: Count
    max_total_tokens: Count
    validation_workers: Count
    max_client_batch_size: Count
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None


TGI_RESPONSE_MODELS = {
    model.__name__: model
    for model in (GenerateResponse, StreamResponse, TokenizeResponse, Info, ErrorResponse)
}
