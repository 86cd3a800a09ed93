"""`text-generation-launcher download-weights MODEL_ID`: gets the model ready to serve (a hub id
downloaded into the Hugging Face cache, a GGUF file converted) and exits, as TGI's
`text-generation-server download-weights`. The launcher runs the same step before it starts the
shards, which then load from the local folder; the folder is printed on stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from shardline.launcher.args import add_flags, log_level
from shardline.log import configure_logging
from shardline.model_files import PACKAGED_MODEL_ALIAS, ModelNotFoundError, resolve_model

logger = logging.getLogger("shardline.launcher")

_FLAGS = ("revision", "dtype", "huggingface_hub_cache", "json_output")


def prepare_model(args: argparse.Namespace) -> Path:
    """The local folder the shards load `args.model_id` from, downloaded or converted first.

    Download progress shows as progress bars on a terminal, else (JSON output, a log collector)
    as log lines.
    """
    return resolve_model(
        args.model_id,
        args.revision,
        dtype=args.dtype,
        cache_dir=args.huggingface_hub_cache,
        log_progress=args.json_output or not sys.stderr.isatty(),
    )


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="text-generation-launcher download-weights",
        description="Downloads (or converts) the model, prints its local folder, and exits.",
    )
    parser.add_argument(
        "model_id",
        nargs="?",
        default=environ.get("MODEL_ID"),
        metavar="MODEL_ID",
        help=f"hub id, local folder or .gguf file [env: MODEL_ID] [default: {PACKAGED_MODEL_ALIAS}]",
    )
    add_flags(parser, environ, _FLAGS)
    return parser


def download_weights(argv: list[str], environ: Mapping[str, str]) -> int:
    args = build_parser(environ).parse_args(argv)
    configure_logging(json_output=args.json_output, level=log_level(environ))
    try:
        model_dir = prepare_model(args)
    except ModelNotFoundError as error:
        logger.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    logger.info("model ready to serve", extra={"model_dir": str(model_dir)})
    print(model_dir, flush=True)
    return 0
