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
        "clients send as 'Authorization: Bearer TOKEN'. API reference: http://HOST:PORT/docs.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="napari-dmoe model files (.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this computer only)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    p.add_argument("--token", default=None,
                   help=f"require this bearer token (default: ${TOKEN_ENV}; the variable keeps it out of `ps`)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--max-request-mb", type=float, default=1024, help="largest request body (default: %(default)s MB)")
    p.add_argument("--max-voxels", type=int, default=512 * 512 * 1024,
                   help="largest volume in values (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, help="requests that may wait for the device (default: 32)")
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
    if not is_loopback(args.host) and token is None:
        raise ValueError(f"--host {args.host} lets other computers connect: give a token (--token or ${TOKEN_ENV}) "
                         "that clients must send, or keep the default --host 127.0.0.1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must be in 1..65535")
    if args.max_request_mb <= 0 or args.max_voxels <= 0 or args.max_queue < 1:
        raise ValueError("--max-request-mb, --max-voxels and --max-queue must be positive")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ValueError(f"dmoe serve needs FastAPI and uvicorn ({err}): pip install 'napari-dmoe[server]'") from None

    from napari_dmoe.devices import DeviceError, resolve_device
    from napari_dmoe.server.app import Limits, create_app
    from napari_dmoe.server.models import ModelStore

    try:
        device, reason = resolve_device(args.device)
    except DeviceError as err:
        raise ValueError(str(err)) from None
    store = ModelStore(args.models, device)
    import napari_dmoe.inference.engine  # noqa: F401  (loaded now, so the first request does not wait for it)

    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_voxels=args.max_voxels,
                    max_waiting=args.max_queue)
    app = create_app(store, token=token, limits=limits, device_reason=reason)
    print(f"dmoe serve: {len(store.ids())} model(s) {store.ids()} on {device} ({reason}); "
          f"http://{args.host}:{args.port} {'(token required)' if token else '(no token)'}", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
