"""`xgenmm serve`: the OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`).

Binds to 127.0.0.1 unless --host says otherwise. Set an API key with --api-key or $XGENMM_API_KEY (clients send
`Authorization: Bearer <key>`). Image URLs in requests must be data: URLs unless --allow-remote-images.
"""

from __future__ import annotations

import argparse

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
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        from ..server import ServerConfig, run_server
    except ImportError as exc:
        raise CLIError(f"the server needs extra packages ({exc.name} is missing): "
                       "pip install 'xgenmm[server]'") from None
    resolve_model(args.model)
    config = ServerConfig(
        model=args.model, device=args.device, dtype=args.dtype, served_model_name=args.served_model_name,
        host=args.host, port=args.port, api_key=args.api_key, allow_remote_images=args.allow_remote_images,
        max_request_bytes=args.max_request_bytes, max_images_per_request=args.max_images_per_request,
        max_image_bytes=args.max_image_bytes, max_tokens_default=args.max_tokens_default,
        engine_options=engine_options(args), log_level=args.log_level)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.resolved_api_key():
        eprint(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it")
    eprint(f"loading {args.model} ...")
    run_server(config)
    return 0
