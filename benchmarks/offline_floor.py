"""The hardware floor of an offline run, and where the measured run's time went against it.

The floor of a workload (no schedule can beat it): every linear layer's FLOPs for every token
at the device's measured matmul rate (FP8's for FP8 projections), with its weights and KV cache
in the bytes the run stores them in, plus causal prefill attention's FLOPs at that rate, plus
every decode step's KV-cache reads at the measured copy bandwidth; no run is shorter than its
longest request's chain of sequential steps, each of which reads every weight once.

The floor of one engine call (what this schedule could do): the call's GEMMs at the matmul rate
or one read of the weights, whichever is longer, plus its attention (prefill FLOPs, KV reads).
`StepLog` records each call's kind, rows, prompt tokens and context; `phase_breakdown` sums
calls by phase (prefill and mixed calls, decode calls, the tail of small decode calls, the host
gaps between calls) and prints measured seconds against the floor.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

from benchmarks.call_marks import LAUNCHED_AHEAD, engine_call
from benchmarks.random_model import head_dim, tensor_shapes

TAIL_ROWS = 32  # decode calls with fewer rows: the tail, where a few long requests run alone
DECODE_BAND_EDGES = (TAIL_ROWS, 128, 256, 384)  # decode steps compared band by band


@dataclass(frozen=True)
class ModelShape:
    layers: int
    heads: int
    head_dim: int
    linear_params: int  # every projection of every layer, without the LM head
    lm_head_params: int
    weight_bytes: int  # what one forward pass reads: every layer and the LM head
    kv_bytes_per_token: int  # K and V of every layer

    @classmethod
    def from_config(cls, config: dict, dtype_bytes: int = 2) -> ModelShape:
        shapes = tensor_shapes(config)
        dim = head_dim(config)
        linear = sum(
            math.prod(shape)
            for name, shape in shapes.items()
            if name.startswith("model.layers.") and len(shape) == 2
        )
        layers = config["num_hidden_layers"]
        lm_head = config["vocab_size"] * config["hidden_size"]
        return cls(
            layers=layers,
            heads=config["num_attention_heads"],
            head_dim=dim,
            linear_params=linear,
            lm_head_params=lm_head,
            weight_bytes=dtype_bytes * (linear + lm_head),
            kv_bytes_per_token=2 * layers * config["num_key_value_heads"] * dim * dtype_bytes,
        )

    def stored_as(self, weight_bytes: int, head_bytes: int, kv_bytes: int) -> ModelShape:
        """The shape with its projections, LM head and KV cache stored in these element sizes
        (from_config's are all 16-bit): FP8 weights or cache are 1."""
        return dataclasses.replace(
            self,
            weight_bytes=weight_bytes * self.linear_params + head_bytes * self.lm_head_params,
            kv_bytes_per_token=self.kv_bytes_per_token // 2 * kv_bytes,
        )

    def gemm_flops(self, tokens: int, logit_rows: int) -> float:
        return 2.0 * (self.linear_params * tokens + self.lm_head_params * logit_rows)

    def gemm_seconds(self, tokens: int, logit_rows: int, ceil: Ceilings) -> float:
        """The decoder projections at the linear layers' rate (FP8's for `--quantize fp8`), the
        LM head at the 16-bit one."""
        linear = 2.0 * self.linear_params * tokens / ceil.linear_rate
        return linear + 2.0 * self.lm_head_params * logit_rows / ceil.matmul_flops

    def attention_flops(self, query_key_pairs: float) -> float:
        """QK^T and PV over every (query, visible key) pair, all layers and heads."""
        return 4.0 * self.layers * self.heads * self.head_dim * query_key_pairs


def causal_pairs(prefix: int, new: int) -> int:
    """(query, visible key) pairs of `new` prompt tokens after `prefix` cached ones."""
    return new * prefix + new * (new + 1) // 2


@dataclass(frozen=True)
class Ceilings:
    matmul_flops: float  # 16-bit
    bytes_s: float
    linear_flops: float | None = None  # the decoder projections' when not 16-bit (FP8)

    @property
    def linear_rate(self) -> float:
        return self.linear_flops or self.matmul_flops

    @classmethod
    def of(cls, measured: dict, fp8_linears: bool = False) -> Ceilings:
        """roofline.device_ceilings' numbers; with `fp8_linears` the projections at its FP8
        rate (one without it, on a GPU with no FP8 GEMM, prices them at the 16-bit one)."""
        linear = measured.get("fp8_matmul_flops") if fp8_linears else None
        return cls(measured["matmul_flops"], measured["copy_bytes_s"], linear)


def workload_floor(shape: ModelShape, pairs: list[tuple[int, int]], ceil: Ceilings) -> dict:
    """`pairs`: (prompt tokens, output tokens) of each request."""
    prompt = sum(n_in for n_in, _ in pairs)
    output = sum(n_out for _, n_out in pairs)
    decode_inputs = sum(n_out - 1 for _, n_out in pairs)  # the first token comes from prefill
    # Decode step j of a request reads its prompt and the j tokens generated so far.
    kv_reads = sum((n_out - 1) * n_in + n_out * (n_out - 1) // 2 for n_in, n_out in pairs)
    prefill_pairs = sum(causal_pairs(0, n_in) for n_in, _ in pairs)
    gemm_s = shape.gemm_seconds(prompt + decode_inputs, output, ceil)
    prefill_attention_s = shape.attention_flops(prefill_pairs) / ceil.matmul_flops
    kv_read_s = kv_reads * shape.kv_bytes_per_token / ceil.bytes_s
    chain_s = max(n_out for _, n_out in pairs) * shape.weight_bytes / ceil.bytes_s
    floor_s = max(gemm_s + prefill_attention_s + kv_read_s, chain_s)
    return {
        "prompt_tokens": prompt,
        "output_tokens": output,
        "gemm_s": round(gemm_s, 3),
        "prefill_attention_s": round(prefill_attention_s, 3),
        "kv_read_tokens": kv_reads,
        "kv_read_s": round(kv_read_s, 3),
        "longest_chain_s": round(chain_s, 3),
        "floor_s": round(floor_s, 3),
        "floor_output_tok_s": round(output / floor_s),
    }


@dataclass(frozen=True)
class Call:
    kind: str  # "prefill" (prompts only), "mixed" (prompts beside decoding rows), "decode"
    decode_rows: int
    prompt_tokens: int
    context_tokens: int  # cached tokens the decode rows attend to
    prompt_pairs: int  # causal (query, key) pairs of the prompt tokens
    seconds: float
    gap_before_s: float = 0.0  # since the engine's previous call returned
    # A decode step launched ahead (ShardEngine.decode) was on the device during that gap, so
    # the gap overlapped device work; without one the device had nothing to do.
    ahead_in_flight: bool = False
    # Launching the next step ahead inside this call: its wall time, and the part of it the
    # engine thread spent off the CPU (waiting for the GIL the router's Python holds, in `LLM`).
    launch_s: float = 0.0
    launch_off_cpu_s: float = 0.0

    def floor_s(self, shape: ModelShape, ceil: Ceilings) -> float:
        logit_rows = self.decode_rows + (1 if self.prompt_tokens else 0)
        gemm = shape.gemm_seconds(self.decode_rows + self.prompt_tokens, logit_rows, ceil)
        weights_or_gemm = max(gemm, shape.weight_bytes / ceil.bytes_s)
        attention = shape.attention_flops(self.prompt_pairs) / ceil.matmul_flops
        kv = self.context_tokens * shape.kv_bytes_per_token / ceil.bytes_s
        return weights_or_gemm + attention + kv


def _cached_tokens(engine, batch_ids) -> tuple[int, int]:
    batches = [engine.batches[i] for i in batch_ids if i in engine.batches]
    return (
        sum(batch.size for batch in batches),
        sum(seq.num_cached for batch in batches for seq in batch.sequences),
    )


@dataclass
class StepLog:
    """The engine's calls of one run, timed around its prefill_step and decode_step (which the
    in-process client calls, and the gRPC answers wrap)."""

    engine: object
    calls: list[Call] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    last_end: float | None = None
    launch: tuple[float, float] = (0.0, 0.0)  # the current call's launch ahead: wall, off-CPU

    @classmethod
    def attach(cls, engine) -> StepLog:
        log = cls(engine)
        prefill, decode = engine.prefill_step, engine.decode_step  # what both paths call
        launch_ahead = engine._launch  # a Decode's or a Prefill's step launched ahead

        def timed_launch(batch, tokens, ahead):
            wall, cpu = time.perf_counter(), time.thread_time()
            with engine_call(LAUNCHED_AHEAD):
                launched = launch_ahead(batch, tokens, ahead)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            log.launch = (wall, max(wall - cpu, 0.0))
            return launched

        def timed(describe, call):
            def wrapper(request):
                kind, rows, context, prompt, pairs = describe(request)
                ahead = engine._ahead is not None
                started = time.perf_counter()
                with engine_call(kind):
                    answer = call(request)
                ended = time.perf_counter()
                gap = 0.0 if log.last_end is None else started - log.last_end
                log.last_end = ended
                facts = (kind, rows, prompt, context, pairs, ended - started, gap, ahead)
                log.calls.append(Call(*facts, *log.launch))
                log.launch = (0.0, 0.0)
                return answer

            return wrapper

        def prefill_call(request):
            rows, context = _cached_tokens(engine, [b.id for b in request.cached_batches])
            chunks = [
                (r.prefix_len, (r.chunk_len or len(r.input_ids) - r.prefix_len))
                for r in request.batch.requests
            ]
            prompt = sum(new for _, new in chunks)
            pairs = sum(causal_pairs(prefix, new) for prefix, new in chunks)
            return ("mixed" if rows else "prefill", rows, context, prompt, pairs)

        def decode_call(request):
            rows, context = _cached_tokens(engine, [b.id for b in request.batches])
            return ("decode", rows, context, 0, 0)

        engine.prefill_step = timed(prefill_call, prefill)
        engine.decode_step = timed(decode_call, decode)
        engine._launch = timed_launch
        return log

    def detach(self) -> None:
        del self.engine.prefill_step, self.engine.decode_step, self.engine._launch

    def summary(self) -> dict:
        """Per kind and band of 32 decode rows: calls, mean prompt tokens, mean ms."""
        bands: dict[str, list[Call]] = {}
        for call in self.calls:
            bands.setdefault(f"{call.kind} {32 * (call.decode_rows // 32)}+", []).append(call)
        return {
            band: {
                "calls": len(calls),
                "prompt_tokens": round(statistics.fmean(c.prompt_tokens for c in calls)),
                "ms": round(1e3 * statistics.fmean(c.seconds for c in calls), 2),
            }
            for band, calls in sorted(bands.items())
        }


def rows_band(rows: int) -> str:
    """The band of DECODE_BAND_EDGES a decode step of `rows` rows falls in ("< 32", "32-127",
    ..., "384+")."""
    lower = 0
    for edge in DECODE_BAND_EDGES:
        if rows < edge:
            return f"{lower}-{edge - 1}" if lower else f"< {edge}"
        lower = edge
    return f"{lower}+"


def _phase(call: Call) -> str:
    if call.prompt_tokens:
        return "prefill and mixed calls"
    return "decode calls" if call.decode_rows >= TAIL_ROWS else f"decode tail (< {TAIL_ROWS} rows)"


def phase_breakdown(calls: list[Call], wall_s: float, shape: ModelShape, ceil: Ceilings) -> dict:
    """Measured seconds and this schedule's floor by phase; host gaps are the wall time that no
    engine call covered."""
    phases: dict[str, dict] = {}
    for call in calls:
        phase = phases.setdefault(_phase(call), {"calls": 0, "seconds": 0.0, "floor_s": 0.0})
        phase["calls"] += 1
        phase["seconds"] += call.seconds
        phase["floor_s"] += call.floor_s(shape, ceil)
    in_calls = sum(call.seconds for call in calls)
    phases["host gaps between calls"] = {
        "calls": 0,
        "seconds": wall_s - in_calls,
        "floor_s": 0.0,
        # The part of the gaps that overlapped a step launched ahead (an upper bound of what
        # the device computed meanwhile); the rest left the device idle.
        "ahead_in_flight_s": round(sum(c.gap_before_s for c in calls if c.ahead_in_flight), 3),
        # Inside the calls: launching steps ahead, and the part of that spent off the CPU.
        "launch_ahead_s": round(sum(c.launch_s for c in calls), 3),
        "launch_ahead_off_cpu_s": round(sum(c.launch_off_cpu_s for c in calls), 3),
    }
    for phase in phases.values():
        phase["seconds"] = round(phase["seconds"], 3)
        phase["floor_s"] = round(phase["floor_s"], 3)
        phase["share_of_wall"] = round(phase["seconds"] / wall_s, 3)
    return phases


def floor_table(workload: dict, phases: dict, wall_s: float) -> list[tuple[str, str, str]]:
    schedule_floor = sum(phase["floor_s"] for phase in phases.values())
    rows = [
        (
            "workload floor s (tok/s)",
            f"{workload['floor_s']:.2f}",
            f"{workload['floor_output_tok_s']} tok/s; run at "
            f"{100 * workload['floor_s'] / wall_s:.0f} % of it",
        ),
        (
            "  GEMMs / prefill attn / KV reads",
            f"{workload['gemm_s']:.2f}/{workload['prefill_attention_s']:.2f}"
            f"/{workload['kv_read_s']:.2f}",
            f"longest chain {workload['longest_chain_s']:.2f} s",
        ),
        ("this schedule's floor s", f"{schedule_floor:.2f}", "sum of each call's floor"),
    ]
    for name, phase in phases.items():
        note = f"{phase['calls']} calls, floor {phase['floor_s']:.2f} s"
        if "ahead_in_flight_s" in phase:
            note += (
                f"; {phase['ahead_in_flight_s']:.2f} s with a step launched ahead in flight; "
                f"launches ahead {phase['launch_ahead_s']:.2f} s in calls, "
                f"{phase['launch_ahead_off_cpu_s']:.2f} s of it off the CPU"
            )
        rows.append((f"  {name}", f"{phase['seconds']:.2f}", note))
    return rows


def achieved_rates(by_call: dict[str, dict], calls: list[Call], shape: ModelShape) -> dict:
    """What a profiled run's kernels achieved (`by_call`: kernel_profile's seconds by call kind
    and kernel class): the prefill and mixed calls' linear FLOPs over their GEMM kernels'
    seconds, and the decode calls' weight reads and KV-cache reads over their GEMM and
    attention kernels' seconds (a decode's kernels are launched in its own call or, ahead, in
    the call before it). Against the device's ceilings they say how far each kernel class is
    from its roofline in the shapes the run had."""

    def seconds(kinds: tuple[str, ...], label: str) -> float:
        return sum(by_call.get(kind, {}).get("classes_s", {}).get(label, 0.0) for kind in kinds)

    prompt_calls = [call for call in calls if call.prompt_tokens]
    decode_calls = [call for call in calls if not call.prompt_tokens]
    flops = sum(
        shape.gemm_flops(call.decode_rows + call.prompt_tokens, call.decode_rows + 1)
        for call in prompt_calls
    )
    decode_kinds = ("decode", LAUNCHED_AHEAD)
    weights = len(decode_calls) * shape.weight_bytes
    kv = sum(call.context_tokens for call in decode_calls) * shape.kv_bytes_per_token
    rates = {
        "prefill_gemm_tflop_s": (flops, seconds(("prefill", "mixed"), "gemm"), 1e12),
        "decode_gemm_weight_gb_s": (weights, seconds(decode_kinds, "gemm"), 1e9),
        "decode_attention_kv_gb_s": (kv, seconds(decode_kinds, "attention"), 1e9),
    }
    return {
        name: round(work / s / unit, 1) if s else None for name, (work, s, unit) in rates.items()
    }
