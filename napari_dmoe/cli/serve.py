"""``dmoe serve``: keep models loaded and segment volumes sent over HTTP (napari, 3D Slicer, scripts)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

TOKEN_ENV = "DMOE_SERVE_TOKEN"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="segmentation server for napari and 3D Slicer clients",
        description="Serve MODEL files over HTTP: /health, /models (classes, attribute vocabularies, what each model "
        "was trained on), /segment (a volume with its geometry in, the mask on the same grid out). Binds to "
        f"127.0.0.1 unless --host says otherwise; any other address needs a token (--token or ${TOKEN_ENV}), which "
        "clients send as 'Authorization: Bearer TOKEN' (only a bare liveness check, /health without a token, answers "
        "without it). API description: http://HOST:PORT/openapi.json (with the token).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="napari-dmoe model files (.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this computer only)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    p.add_argument("--token", default=None,
                   help=f"require this bearer token (default: ${TOKEN_ENV}; the variable keeps it out of `ps`)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--max-request-mb", type=float, default=1024, help="largest request body (default: %(default)s MB)")
    p.add_argument("--max-voxels", type=int, default=512 * 512 * 1024,
                   help="largest volume in values, as sent and after resampling to the model's voxel size "
                   "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests that may wait (uploading or queued) while one runs on the device (default: 32)")
    p.add_argument("--max-inflight-mb", type=float, default=None,
                   help="request bodies held at once, all requests together (default: twice --max-request-mb)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections; more are answered 503 (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=20.0,
                   help="seconds a request's header may take to arrive, and a body may stay silent (default: 20)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def run(args: argparse.Namespace) -> int:
    token = (args.token or os.environ.get(TOKEN_ENV) or "").strip() or None
    host = args.host.strip().removeprefix("[").removesuffix("]")  # [::1] as in URLs; uvicorn wants ::1
    if not is_loopback(host) and token is None:
        raise ValueError(f"--host {args.host} lets other computers connect: give a token (--token or ${TOKEN_ENV}) "
                         "that clients must send, or keep the default --host 127.0.0.1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must be in 1..65535")
    inflight_mb = 2 * args.max_request_mb if args.max_inflight_mb is None else args.max_inflight_mb
    if min(args.max_request_mb, args.max_voxels, args.max_queue, args.max_connections, args.request_timeout) <= 0:
        raise ValueError("--max-request-mb, --max-voxels, --max-queue, --max-connections and --request-timeout "
                         "must be positive")
    if inflight_mb < args.max_request_mb:
        raise ValueError(f"--max-inflight-mb {inflight_mb:g} is below --max-request-mb {args.max_request_mb:g}: no "
                         "request of the largest size could be received")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ValueError(f"dmoe serve needs FastAPI and uvicorn ({err}): pip install 'napari-dmoe[server]'") from None

    from napari_dmoe.devices import DeviceError, resolve_device
    from napari_dmoe.server.app import Limits, create_app
    from napari_dmoe.server.guard import TimedH11Protocol
    from napari_dmoe.server.models import ModelStore

    try:
        device, reason = resolve_device(args.device)
    except DeviceError as err:
        raise ValueError(str(err)) from None
    store = ModelStore(args.models, device)
    import napari_dmoe.inference.engine  # noqa: F401  (loaded now, so the first request does not wait for it)

    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_voxels=args.max_voxels,
                    max_waiting=args.max_queue, max_inflight_bytes=int(inflight_mb * 2**20),
                    body_idle_s=args.request_timeout)
    app = create_app(store, token=token, limits=limits, device_reason=reason)
    print(f"dmoe serve: {len(store.ids())} model(s) {store.ids()} on {device} ({reason}); "
          f"http://{'[' + host + ']' if ':' in host else host}:{args.port} "
          f"{'(token required)' if token else '(no token)'}", file=sys.stderr, flush=True)
    _log_to_stderr(args.log_level)
    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout": args.request_timeout})
    # h11 always (httptools has no header time limit here); limit_concurrency bounds open connections
    uvicorn.run(app, host=host, port=args.port, log_level=args.log_level, http=protocol,
                limit_concurrency=args.max_connections, timeout_keep_alive=5)
    return 0


def _log_to_stderr(level: str) -> None:
    """The server's own lines (a client gone, a closed slow connection, a 500's traceback) beside uvicorn's."""
    import logging

    logger = logging.getLogger("napari_dmoe.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
