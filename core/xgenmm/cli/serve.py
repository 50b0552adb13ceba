"""`xgenmm serve`: the OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`).

Binds to 127.0.0.1 unless --host says otherwise; another address needs an API key (or --insecure-no-api-key). Set
the key with --api-key or $XGENMM_API_KEY (clients send `Authorization: Bearer <key>`). A loopback server answers only
its own Host names, and no web page can call it unless --allowed-origins lists its origin. Image URLs in requests
must be data: URLs unless --allow-remote-images. Budgets (images, pixels, n, max_tokens) are checked before work.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import CLIError, add_engine_args, add_model_args, engine_options, eprint, parse_size, resolve_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this Bearer key (default: $XGENMM_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only, size and time limited)")
    p.add_argument("--max-images-per-request", type=int, default=8)
    p.add_argument("--max-request-bytes", type=parse_size, default=32 * 1024**2, metavar="SIZE",
                   help="largest request body (default 32MiB)")
    p.add_argument("--max-image-bytes", type=parse_size, default=20 * 1024**2, metavar="SIZE",
                   help="largest single image, decoded from base64 or fetched (default 20MiB)")
    p.add_argument("--max-tokens-default", type=int, default=None,
                   help="max_tokens when a request sets none (default: until the context is full)")
    p.add_argument("--max-tokens-ceiling", type=int, default=131_072,
                   help="refuse requests asking for more max_tokens; up to it, max_tokens is capped to the context")
    p.add_argument("--max-n", type=int, default=16, help="most choices per request (default 16)")
    p.add_argument("--max-image-pixels", type=int, default=36_000_000,
                   help="largest image in pixels, read from its header before decoding (default 36M)")
    p.add_argument("--max-request-image-pixels", type=int, default=72_000_000,
                   help="all images of one request together, in pixels (default 72M)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host names to answer besides loopback and --host ('*': any)")
    p.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                   help="comma-separated web origins allowed to call the API from a browser (CORS; '*': any)")
    p.add_argument("--metrics-without-api-key", action="store_true",
                   help="serve /metrics without the API key even when one is set")
    p.add_argument("--insecure-no-api-key", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who can reach it can use it)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection that has not sent a complete request's headers this long after it opened "
                        "(or, kept alive, after the next request's first byte) (default 10)")
    p.add_argument("--body-chunk-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="answer 408 and close when the next piece of a request body takes longer (default 15)")
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="answer 408 and close when a whole request body takes longer (default 60)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close an idle keep-alive connection after this long (default 5)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="connections (and requests in flight) served at once; more get 503 (default 256)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(run=run)
    return p


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def run(args: argparse.Namespace) -> int:
    try:
        from ..server import ServerConfig, run_server
    except ImportError as exc:
        raise CLIError(f"the server needs extra packages ({exc.name} is missing): "
                       'pip install ".[server]" in the xgenmm folder (README "Install")') from None
    resolve_model(args.model)
    config = ServerConfig(
        model=args.model, device=args.device, dtype=args.dtype, served_model_name=args.served_model_name,
        host=args.host, port=args.port, api_key=args.api_key, allow_remote_images=args.allow_remote_images,
        max_request_bytes=args.max_request_bytes, max_images_per_request=args.max_images_per_request,
        max_image_bytes=args.max_image_bytes, max_tokens_default=args.max_tokens_default,
        max_tokens_ceiling=args.max_tokens_ceiling, max_n=args.max_n, max_image_pixels=args.max_image_pixels,
        max_request_image_pixels=args.max_request_image_pixels, allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins), metrics_require_api_key=not args.metrics_without_api_key,
        insecure_no_api_key=args.insecure_no_api_key, engine_options=engine_options(args), log_level=args.log_level,
        header_timeout_s=args.header_timeout, body_chunk_timeout_s=args.body_chunk_timeout,
        body_timeout_s=args.body_timeout, keep_alive_timeout_s=args.keep_alive_timeout,
        max_connections=args.max_connections)
    try:
        config.validate()
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if not config.is_loopback and not config.resolved_api_key():
        eprint(f"warning: serving on {args.host} without an API key (--insecure-no-api-key)")
    eprint(f"loading {args.model} ...")
    run_server(config)
    return 0
