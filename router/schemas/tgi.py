"""TGI's request bodies, declared once: `/generate`, `/generate_stream`, `/` and `/tokenize` parse
them, their 422s name their fields, and `/openapi.json` shows them. Names, types, defaults and
documented bounds are TGI's (plus vLLM's extras); bounds that come from the server's flags
(`--max-best-of`, `--max-top-n-tokens`, ...) are the Validator's, the engine's ranges
`SamplingParams`'."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Strict, WithJsonSchema, model_validator

from shardline.router.schemas.common import (
    GRAMMAR_TYPES,
    Expect,
    FiniteFloat,
    GrammarField,
    Namespace,
    StrictBool,
    StrictInt,
    StrictStr,
    StrList,
    TokenIds,
)
from shardline.sampling_params import MAX_SEED, PENALTY_LIMIT

_GRAMMAR_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string", "enum": list(GRAMMAR_TYPES)}, "value": {}},
    "description": (
        'Constrained output: {"type": "json", "value": <JSON schema>}, {"type": "regex", '
        '"value": "<regex>"} or {"type": "json_schema", "value": {"schema": <JSON schema>}}'
    ),
}
GrammarSpec = Annotated[GrammarField, WithJsonSchema(_GRAMMAR_SCHEMA)]
_WARPERS = ("temperature", "top_k", "top_p", "typical_p", "min_p")


class GenerateParameters(BaseModel):
    """TGI's `parameters`: null means absent, unknown names are ignored (as TGI ignores them)."""

    adapter_id: StrictStr | None = Field(
        None, description="Lora adapter id. Not supported: rejected with 422."
    )
    best_of: StrictInt | None = Field(
        None,
        gt=0,
        description="Generate best_of sequences (at most --max-best-of; sampling, no seed, not "
        "streamed) and return the one of highest mean token logprob.",
    )
    decoder_input_details: StrictBool = Field(
        False, description="Whether to return decoder input token logprobs and ids."
    )
    details: StrictBool = Field(False, description="Whether to return generation details.")
    do_sample: StrictBool = Field(False, description="Activate logits sampling.")
    frequency_penalty: FiniteFloat | None = Field(
        None,
        ge=-PENALTY_LIMIT,
        le=PENALTY_LIMIT,
        description="Penalize new tokens based on their existing frequency in the text so far.",
    )
    grammar: GrammarSpec | None = None
    max_new_tokens: StrictInt | None = Field(
        None,
        gt=0,
        json_schema_extra={"format": "int32"},
        description="Maximum number of tokens to generate; by default what the context leaves.",
    )
    repetition_penalty: FiniteFloat | None = Field(
        None,
        gt=0.0,
        description="The parameter for repetition penalty. 1.0 means no penalty.",
    )
    return_full_text: StrictBool | None = Field(
        None, description="Whether to prepend the prompt to the generated text"
    )
    seed: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        json_schema_extra={"format": "int64"},
        description="Random sampling seed.",
    )
    stop: StrList = Field(
        default_factory=list,
        description="Stop generating tokens if a member of `stop` is generated.",
    )
    temperature: FiniteFloat | None = Field(
        None, gt=0.0, description="The value used to module the logits distribution."
    )
    top_k: StrictInt | None = Field(
        None,
        gt=0,
        json_schema_extra={"format": "int32"},
        description="The number of highest probability vocabulary tokens to keep for top-k-filtering.",
    )
    top_n_tokens: StrictInt | None = Field(
        None,
        ge=0,
        json_schema_extra={"format": "int32"},
        description="The number of most likely tokens to return at each step (--max-top-n-tokens).",
    )
    top_p: FiniteFloat | None = Field(
        None, gt=0.0, lt=1.0, description="Top-p value for nucleus sampling."
    )
    truncate: StrictInt | None = Field(
        None, description="Truncate inputs tokens to the given size (at most --max-input-tokens)."
    )
    typical_p: FiniteFloat | None = Field(None, gt=0.0, lt=1.0, description="Typical Decoding mass")
    watermark: StrictBool = Field(
        False,
        description="Kirchenbauer et al.'s watermark (WATERMARK_GAMMA, WATERMARK_DELTA)",
    )
    # vLLM's extras.
    presence_penalty: FiniteFloat | None = Field(
        None,
        ge=-PENALTY_LIMIT,
        le=PENALTY_LIMIT,
        description="Penalize new tokens that already appear in the text.",
    )
    min_p: FiniteFloat | None = Field(
        None, ge=0.0, le=1.0, description="Keep tokens at least min_p as likely as the top one."
    )
    min_tokens: StrictInt = Field(0, ge=0, description="Tokens generated before EOS may end.")
    ignore_eos: StrictBool = Field(False, description="Generate past the EOS token.")
    skip_special_tokens: StrictBool = Field(True, description="Leave special tokens out of text.")
    stop_token_ids: TokenIds = Field(
        default_factory=list, description="Token ids that end the generation."
    )
    # Beam search (vLLM's names): the best beam is the answer, the others its best_of_sequences.
    use_beam_search: StrictBool = Field(
        False, description="Beam search (not streamed): the best beam answers."
    )
    beam_width: StrictInt = Field(1, gt=0, description="Beams kept (at most --max-best-of).")
    cache_salt: StrictStr | None = Field(
        None,
        description="Prefix-cache isolation (vLLM's): only requests of the same non-empty salt "
        "share cached prompt blocks",
    )
    length_penalty: FiniteFloat = Field(1.0, description="Beam score's exponent of the length.")
    early_stopping: Annotated[StrictBool | Literal["never"], Expect('true, false or "never"')] = (
        False
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value is not None}
        return data

    @property
    def samples(self) -> bool:
        """TGI samples when asked to, or when any warper is set."""
        return self.do_sample or any(getattr(self, name) is not None for name in _WARPERS)


Inputs = Annotated[str, Strict(), Expect("a string"), WithJsonSchema({"type": "string"})]
OptionalParameters = Annotated[GenerateParameters | None, Expect("a JSON object"), Namespace()]


class GenerateRequest(BaseModel):
    """`/generate` and `/generate_stream`; `parameters` null means the defaults."""

    inputs: Inputs = Field(examples=["My name is Olivier and I"])
    parameters: OptionalParameters = None

    @property
    def generation(self) -> GenerateParameters:
        return self.parameters or _DEFAULTS


class CompatGenerateRequest(GenerateRequest):
    """`/`: `stream` picks /generate_stream's answer."""

    stream: StrictBool = False


class TokenizeRequest(BaseModel):
    """`/tokenize`: TGI's GenerateRequest, whose parameters are not read."""

    inputs: Inputs
    parameters: Annotated[dict[str, Any] | None, Expect("a JSON object")] = None


_DEFAULTS = GenerateParameters()
