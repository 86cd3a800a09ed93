"""Beam search as transformers' `generate(num_beams=W, do_sample=False)` runs it.

Every step each running beam proposes its `candidates` most likely next tokens (the sampler's
top-n logprobs); their cumulative logprobs are ranked together. The best W candidates that do
not stop become the running beams; a stopping candidate (EOS, a stop token, or the length
limit) among the best W competes for one of W finished slots with the score
cumulative logprob / generated_tokens ** length_penalty. The search ends when every candidate
stops, when W beams finished with early_stopping=True, or when no running beam can still beat
the worst finished one (transformers' heuristic for early_stopping False and "never").

The arithmetic is float32 tensor arithmetic in transformers' order, so ties break the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shard_answers import Tokens
from shardline.shards.sequences.stopping import StopRule

# transformers' stand-in for -inf in beam scores.
_PENALTY = -1.0e9


def candidates_per_step(width: int, num_stop_ids: int) -> int:
    """Candidates ranked per step: enough that W of them never stop (transformers' rule)."""
    return max(2, 1 + num_stop_ids) * width


@dataclass(frozen=True)
class Hypothesis:
    """A beam's generated tokens with the logprob each was chosen with."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()

    def extended(self, token_id: int, logprob: float) -> Hypothesis:
        return Hypothesis((*self.token_ids, token_id), (*self.logprobs, logprob))


@dataclass(frozen=True)
class FinishedBeam:
    hypothesis: Hypothesis
    finish_reason: int
    score: float


@dataclass(frozen=True)
class BeamStep:
    """The outcome of one step: the new running beams (empty when the search ended)."""

    parents: list[int]  # for each new beam, the index of the running beam it extends
    token_ids: list[int]
    done: bool


@dataclass
class BeamSearch:
    """The search state of one request; its running beams are rows of the shard's batch."""

    width: int
    length_penalty: float
    early_stopping: int  # pb.EarlyStopping
    num_return_sequences: int
    stop: StopRule  # EOS and stop ids stop a candidate from the first step, as in transformers
    prompt_tokens: Tokens | None = None
    generated: int = 0
    improvable: bool = True
    running_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(1))
    hypotheses: list[Hypothesis] = field(default_factory=lambda: [Hypothesis()])
    finished_scores: torch.Tensor = field(init=False)
    finished: list[FinishedBeam | None] = field(init=False)

    def __post_init__(self) -> None:
        self.finished_scores = torch.full((self.width,), _PENALTY)
        self.finished = [None] * self.width

    @property
    def candidates(self) -> int:
        return candidates_per_step(self.width, len(self.stop.stop_ids))

    def step(self, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> BeamStep:
        """Advances by one token; top_ids / top_logprobs [R, >= candidates] for the R beams."""
        accumulated = top_logprobs + self.running_scores[:, None]
        scores, index = accumulated.flatten().topk(min(self.candidates, accumulated.numel()))
        beam_rows = index // top_ids.shape[1]
        token_ids = top_ids.flatten()[index]
        token_logprobs = top_logprobs.flatten()[index]
        self.generated += 1
        stops = self._stops(token_ids)
        self._update_finished(scores, stops, beam_rows, token_ids, token_logprobs)
        running = (scores + stops.to(torch.float32) * _PENALTY).topk(self.width).indices
        self._advance_running(scores, stops, running, beam_rows, token_ids, token_logprobs)
        done = not self._continues(stops)
        if done:
            return BeamStep(parents=[], token_ids=[], done=True)
        return BeamStep(
            parents=beam_rows[running].tolist(), token_ids=token_ids[running].tolist(), done=False
        )

    def results(self) -> list[FinishedBeam]:
        """The best finished beams, best first, at most num_return_sequences."""
        return [beam for beam in self.finished if beam is not None][: self.num_return_sequences]

    def _stops(self, token_ids: torch.Tensor) -> torch.Tensor:
        reasons = [self._finish_reason(token) for token in token_ids.tolist()]
        return torch.tensor([reason != pb.FINISH_REASON_NONE for reason in reasons])

    def _update_finished(
        self,
        scores: torch.Tensor,
        stops: torch.Tensor,
        beam_rows: torch.Tensor,
        token_ids: torch.Tensor,
        token_logprobs: torch.Tensor,
    ) -> None:
        among_best = torch.arange(len(scores)) < self.width
        just_finished = stops & among_best
        normalized = scores / (float(self.generated) ** self.length_penalty)
        if self._slots_full and self.early_stopping == pb.EARLY_STOPPING_ALWAYS:
            normalized = normalized + _PENALTY
        if not self.improvable:
            normalized = normalized + _PENALTY
        normalized = normalized + (~just_finished).to(torch.float32) * _PENALTY
        merged = torch.cat((self.finished_scores, normalized))
        best = merged.topk(self.width).indices.tolist()
        candidates = [
            self._finished_beam(i, normalized, just_finished, beam_rows, token_ids, token_logprobs)
            for i in range(len(scores))
        ]
        pool = self.finished + candidates
        self.finished_scores = merged[best]
        self.finished = [pool[i] for i in best]

    def _finished_beam(
        self,
        i: int,
        normalized: torch.Tensor,
        just_finished: torch.Tensor,
        beam_rows: torch.Tensor,
        token_ids: torch.Tensor,
        token_logprobs: torch.Tensor,
    ) -> FinishedBeam | None:
        if not just_finished[i]:
            return None
        token = int(token_ids[i])
        hypothesis = self.hypotheses[int(beam_rows[i])].extended(token, float(token_logprobs[i]))
        return FinishedBeam(hypothesis, self._finish_reason(token), float(normalized[i]))

    def _finish_reason(self, token_id: int) -> int:
        return self.stop.finish_reason(token_id, self.generated)

    def _advance_running(
        self,
        scores: torch.Tensor,
        stops: torch.Tensor,
        running: torch.Tensor,
        beam_rows: torch.Tensor,
        token_ids: torch.Tensor,
        token_logprobs: torch.Tensor,
    ) -> None:
        self.running_scores = (scores + stops.to(torch.float32) * _PENALTY)[running]
        self.hypotheses = [
            self.hypotheses[int(beam_rows[i])].extended(int(token_ids[i]), float(token_logprobs[i]))
            for i in running.tolist()
        ]
        self.improvable = self.improvable and self._can_improve()

    @property
    def _slots_full(self) -> bool:
        return all(beam is not None for beam in self.finished)

    def _can_improve(self) -> bool:
        """transformers' early-stop heuristic: can the best running beam beat a finished one?"""
        if self.early_stopping == pb.EARLY_STOPPING_NEVER and self.length_penalty > 0.0:
            best_length = self.stop.max_new_tokens
        else:
            best_length = self.generated
        best_possible = self.running_scores[:1] / (float(best_length) ** self.length_penalty)
        filled = torch.tensor([beam is not None for beam in self.finished])
        worst = torch.where(filled, self.finished_scores.min(), torch.tensor(_PENALTY))
        return bool((best_possible > worst).any())

    def _continues(self, stops: torch.Tensor) -> bool:
        all_finished = self._slots_full and self.early_stopping == pb.EARLY_STOPPING_ALWAYS
        return self.improvable and not all_finished and not bool(stops.all())
