"""When a generating sequence stops, on the token level: the one rule that sampled sequences and
beam searches both apply (stop strings are the router's)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shardline.proto import generate_pb2 as pb


@dataclass(frozen=True)
class StopRule:
    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: frozenset[int]  # none with ignore_eos
    stop_token_ids: frozenset[int]

    @classmethod
    def of(cls, request: pb.Request, model_eos_ids: Iterable[int]) -> StopRule:
        stopping = request.stopping_parameters
        return cls(
            max_new_tokens=stopping.max_new_tokens,
            min_new_tokens=stopping.min_new_tokens,
            eos_token_ids=frozenset() if stopping.ignore_eos_token else frozenset(model_eos_ids),
            stop_token_ids=frozenset(stopping.stop_token_ids),
        )

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.eos_token_ids | self.stop_token_ids

    def finish_reason(self, token_id: int, generated: int) -> int:
        """Why a sequence that has just generated `token_id`, its `generated`-th token, stops
        (FINISH_REASON_NONE: it goes on). EOS and stop ids count only past min_new_tokens."""
        if generated > self.min_new_tokens:
            if token_id in self.eos_token_ids:
                return pb.FINISH_REASON_EOS_TOKEN
            if token_id in self.stop_token_ids:
                return pb.FINISH_REASON_STOP_SEQUENCE
        if generated >= self.max_new_tokens:
            return pb.FINISH_REASON_LENGTH
        return pb.FINISH_REASON_NONE
