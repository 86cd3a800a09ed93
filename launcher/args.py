"""The launcher's flags: TGI's names and defaults, each also read from TGI's environment variable.

A flag on the command line wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardline import __version__
from shardline.launcher.flag_rules import check_nodes, max_input_tokens, resolve_num_shard
from shardline.model_files import PACKAGED_MODEL_ALIAS
from shardline.router.grammar_compiler import GrammarBudget
from shardline.router.paced_admission import SCHEDULING_POLICIES, SERVER_SCHEDULING_POLICY
from shardline.shard_config import QUANTIZE_CHOICES, ROPE_SCALINGS

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_NOT_YET = "not supported yet: "
_NO_NGROK = "not supported: Shardline opens no tunnels; run an ngrok agent in front of its port"


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    env: str | None
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # present = true, as TGI's `--json-output`
    repeated: bool = False  # may be given several times; its env var holds a comma-separated list
    # Why a value is refused at startup (TGI has the flag, Shardline does not do it), but for
    # the values in `accepted`, which change nothing here.
    refused: str | None = None
    accepted: tuple[Any, ...] = ()
    # The ShardConfig field (shardline/shard_config.py) this flag sets, when the shards take it.
    shard_field: str | None = None

    @property
    def long_name(self) -> str:
        return next(name for name in self.names if name.startswith("--"))

    @property
    def dest(self) -> str:
        return self.long_name.removeprefix("--").replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    # model
    Flag(("--model-id",), "MODEL_ID",
         "local folder, hub id (downloaded once into the Hugging Face cache), .gguf file (or a "
         f"folder holding one), or {PACKAGED_MODEL_ALIAS!r}; default: the packaged "
         f"{PACKAGED_MODEL_ALIAS}"),
    Flag(("--revision",), "REVISION", "hub revision (branch, tag or commit) of --model-id",
         shard_field="revision"),
    Flag(("--huggingface-hub-cache",), "HUGGINGFACE_HUB_CACHE",
         "Hugging Face cache folder hub models are downloaded to; default: huggingface_hub's "
         "(HF_HUB_CACHE, else HF_HOME/hub)"),
    Flag(("--dtype",), "DTYPE", "dtype forced upon the weights; default: the shard's choice",
         choices=("float16", "bfloat16", "float32"), shard_field="dtype"),
    Flag(("--trust-remote-code",), "TRUST_REMOTE_CODE",
         "accepted for TGI compatibility: Shardline runs its own model code only", switch=True),
    Flag(("--quantize",), "QUANTIZE", "fp8: full-precision weights quantized to FP8 at load "
         "(FP8 checkpoints, compressed-tensors, fbgemm_fp8 or fp8, are detected from config.json "
         "without it); compressed-tensors: the checkpoint must be one; the others are not "
         "supported yet",
         choices=("awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
                  "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8"),
         refused=_NOT_YET + "only fp8 and compressed-tensors FP8 checkpoints",
         accepted=QUANTIZE_CHOICES, shard_field="quantization"),
    Flag(("--speculate",), "SPECULATE", "tokens to speculate per step; not supported yet "
         "(0 is accepted)", type=int, refused=_NOT_YET + "no speculative decoding; only 0 is "
         "accepted", accepted=(0,)),
    Flag(("--kv-cache-dtype",), "KV_CACHE_DTYPE", "dtype of the KV cache: fp8_e4m3fn or "
         "fp8_e5m2 (scaled by the checkpoint's k_scale / v_scale, else 1.0); default: the "
         "model's", choices=("fp8_e4m3fn", "fp8_e5m2"), shard_field="kv_cache_dtype"),
    Flag(("--rope-scaling",), "ROPE_SCALING", "rotary scaling forced upon the model instead "
         "of its config.json's: linear, or dynamic (NTK) for a model not fine-tuned to the longer "
         "context; by --rope-factor (default 1.0)", choices=ROPE_SCALINGS,
         shard_field="rope_scaling"),
    Flag(("--rope-factor",), "ROPE_FACTOR", "rotary scaling factor: the context grows by it; "
         "alone it means linear scaling", type=float, shard_field="rope_factor"),
    Flag(("--lora-adapters",), "LORA_ADAPTERS", "LoRA adapter ids to load; not supported yet",
         refused=_NOT_YET + "no LoRA adapters"),
    Flag(("--weights-cache-override",), "WEIGHTS_CACHE_OVERRIDE",
         "folder of the weights instead of the hub cache; not supported",
         refused="not supported: pass the folder holding the weights as --model-id"),
    # shards
    Flag(("--sharded",), "SHARDED", "shard the model over every visible GPU (true/false)",
         type=parse_bool),
    Flag(("--num-shard",), "NUM_SHARD", "number of shard processes; default: all visible GPUs, "
         "1 on CPU", type=int, shard_field="world_size"),
    Flag(("--pipeline-parallel-size",), "PIPELINE_PARALLEL_SIZE", "pipeline stages (vLLM's "
         "name): the shards of every node form this many stages of consecutive ranks, tensor "
         "parallel inside each; must divide --num-shard x --nnodes", type=int,
         shard_field="pipeline_parallel_size"),
    Flag(("--pipeline-layer-partition",), "PIPELINE_LAYER_PARTITION", "decoder layers of each "
         "pipeline stage, first to last, e.g. 7,9,9,7 to lighten the first and last stages (they "
         "hold the embedding and the LM head); default: an even split",
         shard_field="pipeline_layer_partition"),
    Flag(("--shard-uds-path",), "SHARD_UDS_PATH", "unix socket prefix of the shards (rank is "
         "appended); default: inside a private directory made for this run"),
    Flag(("--master-addr",), "MASTER_ADDR", "torch.distributed rendezvous address: node 0's, "
         "reachable from every node", default="localhost"),
    Flag(("--master-port",), "MASTER_PORT", "torch.distributed rendezvous port; with several "
         "nodes also port + 1 (node 0's launcher, which the others join) and port + 2 + i "
         "(shard i of a node other than 0, which node 0's router calls)", type=int,
         default=29500),
    Flag(("--distributed-executor-backend",), "DISTRIBUTED_EXECUTOR_BACKEND", "how the shard "
         "processes are started (vLLM's flag): mp, as the launcher's children on this node; ray, "
         "as actors of an existing Ray cluster (RAY_ADDRESS, or `ray start` on this node), one GPU "
         "each, wherever the cluster places them (needs the `ray` extra)",
         choices=("mp", "ray"), default="mp"),
    Flag(("--nnodes",), "NNODES", "nodes (hosts) of the group, a launcher on each (torchrun's "
         "name); the shards of all of them form one world of --num-shard x --nnodes ranks; "
         "needs SHARDLINE_CLUSTER_TOKEN", type=int, default=1),
    Flag(("--node-rank",), "NODE_RANK", "this node's rank, 0 to --nnodes - 1: node 0 runs the "
         "router and the HTTP API and holds the first --num-shard ranks", type=int, default=0),
    Flag(("--rendezvous-timeout",), "RENDEZVOUS_TIMEOUT", "seconds the nodes wait for each "
         "other (a node joins once its weights are downloaded: cover the slowest download, or "
         "download first) and a shard for its group, after which every launcher exits 1",
         type=float, default=300.0),
    Flag(("--block-size",), "BLOCK_SIZE", "tokens per paged KV-cache block", type=int,
         shard_field="block_size"),
    Flag(("--kv-cache-bytes",), "KV_CACHE_BYTES", "KV cache size in bytes on CPU", type=int,
         shard_field="kv_cache_bytes"),
    Flag(("--cuda-memory-fraction", "--gpu-memory-utilization"), "CUDA_MEMORY_FRACTION",
         "fraction of GPU memory that weights, activations and the KV cache may use; "
         "default: the shard's (0.9)", type=float, shard_field="gpu_memory_utilization"),
    Flag(("--attention",), "ATTENTION", "attention backend (auto, torch, triton)",
         shard_field="attention"),
    Flag(("--cuda-graphs",), "CUDA_GRAPHS", "decode batch sizes to capture CUDA graphs for, "
         "e.g. 1,2,4,8; 0 disables", shard_field="cuda_graphs"),
    Flag(("--disable-custom-kernels",), "DISABLE_CUSTOM_KERNELS",
         "the plain torch path: torch attention, no CUDA graphs (the shards' --attention "
         "torch --cuda-graphs 0) and none of the Triton norm, activation, rotary, GEMV and "
         "sampling kernels",
         switch=True),
    Flag(("--prefix-caching",), "PREFIX_CACHING", "reuse the KV blocks of shared prompt "
         "prefixes across requests (true/false; default true)", type=parse_bool,
         shard_field="enable_prefix_caching"),
    Flag(("--watermark-gamma",), "WATERMARK_GAMMA", "watermark green-list fraction, passed "
         "to the shards as WATERMARK_GAMMA", type=float),
    Flag(("--watermark-delta",), "WATERMARK_DELTA", "watermark logit bias, passed to the "
         "shards as WATERMARK_DELTA", type=float),
    # router
    Flag(("--hostname",), "HOSTNAME", "address the HTTP server listens on (0.0.0.0: every "
         "interface); HOSTNAME is ignored when it is this machine's own name, as containers "
         "set it", default="0.0.0.0"),
    Flag(("-p", "--port"), "PORT", "port the HTTP server listens on", type=int, default=3000),
    Flag(("--prometheus-port",), "PROMETHEUS_PORT", "port that serves /metrics without the "
         "API key, on --hostname (0: none; a port already taken is skipped with a warning)",
         type=int, default=9000),
    Flag(("--max-concurrent-requests",), "MAX_CONCURRENT_REQUESTS",
         "requests in flight before new ones get 429", type=int, default=128),
    Flag(("--max-best-of",), "MAX_BEST_OF", "largest best_of a client may ask", type=int,
         default=2),
    Flag(("--max-stop-sequences",), "MAX_STOP_SEQUENCES", "most stop sequences per request",
         type=int, default=4),
    Flag(("--max-top-n-tokens",), "MAX_TOP_N_TOKENS", "largest top_n_tokens a client may ask",
         type=int, default=5),
    Flag(("--max-input-tokens",), "MAX_INPUT_TOKENS", "longest prompt in tokens; default: "
         "from the model and the KV cache", type=int),
    Flag(("--max-input-length",), "MAX_INPUT_LENGTH",
         "deprecated alias of --max-input-tokens", type=int),
    Flag(("--max-total-tokens",), "MAX_TOTAL_TOKENS", "prompt plus generated tokens per "
         "request; default: from the model and the KV cache", type=int),
    Flag(("--waiting-served-ratio",), "WAITING_SERVED_RATIO",
         "waiting/running ratio past which waiting requests join the batch", type=float,
         default=0.3),
    Flag(("--max-batch-prefill-tokens",), "MAX_BATCH_PREFILL_TOKENS",
         "most prompt tokens in one prefill; default: max-input-tokens + 50", type=int),
    Flag(("--max-batch-total-tokens",), "MAX_BATCH_TOTAL_TOKENS",
         "most tokens in a running batch; default: what the KV cache holds", type=int),
    Flag(("--max-waiting-tokens",), "MAX_WAITING_TOKENS",
         "decode steps before waiting requests are forced into the batch", type=int, default=20),
    Flag(("--max-batch-size",), "MAX_BATCH_SIZE", "most requests in one batch", type=int),
    Flag(("--scheduling-policy",), "SCHEDULING_POLICY", "fcfs: waiting requests join in "
         "arrival order (TGI's); paced: longest max_new_tokens first, let in at a pace that "
         "spreads the short ones over the longest one's steps (throughput for a batch job's "
         "backlog; holds requests back, so their first token comes later)",
         choices=SCHEDULING_POLICIES, default=SERVER_SCHEDULING_POLICY),
    Flag(("--api-key",), "API_KEY", "bearer token every request must carry"),
    Flag(("--metrics-without-auth",), "METRICS_WITHOUT_AUTH", "serve /metrics on --port "
         "without --api-key too, as TGI does", switch=True),
    Flag(("--validation-workers",), "VALIDATION_WORKERS", "tokenizer workers of the router",
         type=int, default=2),
    Flag(("--max-client-batch-size",), "MAX_CLIENT_BATCH_SIZE", "most inputs in one request",
         type=int, default=4),
    Flag(("--payload-limit",), "PAYLOAD_LIMIT", "largest request body in bytes", type=int,
         default=2_000_000),
    Flag(("--tokenizer-config-path",), "TOKENIZER_CONFIG_PATH",
         "folder with the tokenizer files, when not the model's"),
    Flag(("--cors-allow-origin",), "CORS_ALLOW_ORIGIN", "origin browsers may call the API "
         "from (repeat the flag, or comma-separate in the variable; * for any); default: none, "
         "browsers keep the same-origin rule (TGI allows any)", repeated=True),
    Flag(("--otlp-endpoint",), "OTLP_ENDPOINT", "OpenTelemetry collector (OTLP/gRPC, e.g. "
         "http://127.0.0.1:4317) sent a trace of each request; default: no tracing"),
    Flag(("--otlp-service-name",), "OTLP_SERVICE_NAME", "service.name of the router's traces",
         default="text-generation-inference.router"),
    Flag(("--enable-prefill-logprobs",), "ENABLE_PREFILL_LOGPROBS", "accepted for TGI "
         "compatibility: prompt logprobs (decoder_input_details) are always available",
         switch=True),
    Flag(("--disable-grammar-support",), "DISABLE_GRAMMAR_SUPPORT",
         "refuse grammar-constrained requests (422)", switch=True),
    Flag(("--grammar-compile-timeout",), "GRAMMAR_COMPILE_TIMEOUT", "seconds one grammar "
         "(JSON schema or regex) may take to compile over the vocabulary, in a worker process "
         "killed past it; the request gets 422", type=float, default=GrammarBudget.timeout_s),
    Flag(("--max-grammar-bytes",), "MAX_GRAMMAR_BYTES", "largest compiled grammar (its token "
         "automaton, in bytes) sent to the shards; a larger one gets 422", type=int,
         default=GrammarBudget.max_bytes),
    Flag(("--shard-step-timeout",), "SHARD_STEP_TIMEOUT",
         "seconds a Prefill, Decode, FilterBatch or ClearCache call may take; past it a shard is "
         "taken as stuck: in-flight requests get 424 and everything stops with exit 1 "
         "(0: no limit)", type=float, default=60.0),
    Flag(("--shard-warmup-timeout",), "SHARD_WARMUP_TIMEOUT",
         "seconds the shards' Warmup (KV cache sizing, CUDA graph capture) may take; past it "
         "everything stops with exit 1 (0: no limit)", type=float, default=1800.0),
    # launcher
    Flag(("--graceful-termination-timeout",), "GRACEFUL_TERMINATION_TIMEOUT",
         "seconds the router may take to finish in-flight requests on SIGTERM (then cut)", type=float,
         default=60.0),
    Flag(("--json-output",), "JSON_OUTPUT", "logs as JSON lines", switch=True),
    Flag(("--usage-stats",), "USAGE_STATS", "accepted for TGI compatibility: Shardline "
         "collects and sends no usage statistics, whatever the value", default="on",
         choices=("on", "off", "no-stack")),
    Flag(("--ngrok",), "NGROK", "ngrok tunnel; not supported", switch=True, refused=_NO_NGROK),
    Flag(("--ngrok-authtoken",), "NGROK_AUTHTOKEN", "ngrok token; not supported",
         refused=_NO_NGROK),
    Flag(("--ngrok-edge",), "NGROK_EDGE", "ngrok edge; not supported", refused=_NO_NGROK),
)  # fmt: skip


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser, its defaults taken from `environ` (the process environment by default)."""
    environ = _without_own_hostname(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(
        prog="text-generation-launcher",
        description="Starts the shards and the router of Shardline and supervises them. "
        "`text-generation-launcher download-weights MODEL_ID` only fetches the model.",
    )
    for flag in FLAGS:
        _add_flag(parser, flag, environ)
    parser.add_argument(
        "-e", "--env", action="store_true", help="log the runtime environment for bug reports"
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"text-generation-launcher {__version__}"
    )
    return parser


def _without_own_hostname(environ: Mapping[str, str]) -> Mapping[str, str]:
    """TGI reads --hostname from HOSTNAME, which every container sets to its own name: the
    server would then listen on that name's address alone (not on localhost). That value is
    no choice of the user's, so it is dropped; any other HOSTNAME (an address) still counts."""
    if environ.get("HOSTNAME") != socket.gethostname():
        return environ
    return {name: value for name, value in environ.items() if name != "HOSTNAME"}


def add_flags(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], dests: Collection[str]
) -> None:
    """The launcher's flags named by `dests` on another command's parser (download-weights)."""
    for flag in FLAGS:
        if flag.dest in dests:
            _add_flag(parser, flag, environ)


def _add_flag(parser: argparse.ArgumentParser, flag: Flag, environ: Mapping[str, str]) -> None:
    default = _env_default(parser, flag, environ)
    env_help = f" [env: {flag.env}]" if flag.env else ""
    shown = "" if default is None or flag.switch else f" [default: {default}]"
    if flag.switch:
        parser.add_argument(
            *flag.names,
            dest=flag.dest,
            action="store_true",
            default=default,
            help=flag.help + env_help,
        )
        return
    parser.add_argument(
        *flag.names,
        dest=flag.dest,
        action=_Repeated if flag.repeated else "store",
        type=flag.type,
        default=default,
        choices=flag.choices,
        metavar=flag.dest.upper(),
        help=flag.help + env_help + shown,
    )


class _Repeated(argparse.Action):
    """Collects every use of the flag; given on the command line, it replaces its variable's."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = getattr(namespace, self.dest)
        earlier = [] if given is self.default else given
        setattr(namespace, self.dest, [*earlier, values])


def _env_default(parser: argparse.ArgumentParser, flag: Flag, environ: Mapping[str, str]) -> Any:
    raw = environ.get(flag.env) if flag.env else None
    if raw is None:
        return False if flag.switch else flag.default
    convert = parse_bool if flag.switch else flag.type
    try:
        if flag.repeated:
            return [convert(item.strip()) for item in raw.split(",") if item.strip()]
        value = convert(raw)
    except (ValueError, argparse.ArgumentTypeError):
        parser.error(f"environment variable {flag.env}={raw!r} is not a valid {flag.dest}")
    if flag.choices and value not in flag.choices:
        parser.error(f"environment variable {flag.env}={raw!r}: choose from {flag.choices}")
    return value


def parse_args(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        refuse_unsupported(args, sys.argv[1:] if argv is None else argv)
        args.max_input_tokens = max_input_tokens(args)
        args.num_shard = resolve_num_shard(args.sharded, args.num_shard, environ)
        check_nodes(args.nnodes, args.node_rank)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return args


def refuse_unsupported(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """A TGI flag or environment variable that Shardline does not act upon stops the start,
    unless its value changes nothing here: none is silently ignored."""
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        if flag.refused is None or value is None or value is False or value in flag.accepted:
            continue
        on_command_line = any(arg.split("=")[0] in flag.names for arg in argv)
        source = flag.long_name if on_command_line else f"{flag.env} ({flag.long_name})"
        raise ValueError(f"{source} is {flag.refused}")


def log_level(environ: Mapping[str, str]) -> str:
    """TGI's LOG_LEVEL (`info`, or `info,target=debug`): its leading level, for every process."""
    return environ.get("LOG_LEVEL", "info").split(",")[0].strip().upper() or "INFO"
