"""The `mist serve` command line. Light: parsing imports none of the server's libraries (FastAPI, SQLAlchemy,
uvicorn), which come with the optional extra `mist-protect[serve]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mist.runner.runner_options import add_runner_options, check_device_option
from mist.runner.work_limits import add_work_limit_options, work_limits_from

_MB = 1024 * 1024


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve the HTTP API (a durable job queue)",
        description="Serve Mist's HTTP API (FastAPI; pip install 'mist-protect[serve]'): POST /v1/jobs, GET "
                    "/v1/jobs/ID, /v1/jobs/ID/results, POST /v1/jobs/ID/cancel, POST /v1/jobs/ID/resume, DELETE "
                    "/v1/jobs/ID, POST /v1/evaluations, /v1/health, /v1/status, /v1/metrics; docs at /docs. "
                    "Jobs and results live in the data folder and survive restarts.")
    _data_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--retention-hours", type=float, default=24.0,
                       help="how long finished jobs' results are kept before they are deleted (default: %(default)s)")
    serve.add_argument("--no-auth", action="store_true",
                       help="on loopback only: requests from this machine need no token (any program or account on "
                            "it can then submit, read and delete jobs, as one owner); default: every request needs a "
                            "token, and the first start creates one and prints it once")
    serve.add_argument("--require-token", action="store_true", help=argparse.SUPPRESS)  # the default since 2.0
    serve.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                       help="a reverse proxy whose X-Forwarded-For / Forwarded headers name the real client (may be "
                            "repeated); other senders' proxy headers are ignored (default: none)")
    add_runner_options(serve, low_memory=True, compile=True, ray=True, text_encoders=True)
    add_work_limit_options(serve)
    _limit_options(serve, "requests without a token (loopback only)")
    actions = serve.add_subparsers(dest="serve_action", metavar="token")
    token = actions.add_parser("token", help="create, list or revoke API tokens",
                               description="API tokens, stored hashed in the data folder's database.")
    token_actions = token.add_subparsers(dest="token_action", required=True, metavar="ACTION")
    create = token_actions.add_parser("create", help="create a token (printed once)")
    create.add_argument("name", help="a name for whom it is for")
    _data_options(create)
    _limit_options(create, "this token")
    listing = token_actions.add_parser("list", help="list tokens (never their secrets)")
    _data_options(listing)
    revoke = token_actions.add_parser("revoke", help="revoke a token by name or id")
    revoke.add_argument("name", help="the token's name or id")
    _data_options(revoke)


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("mist-data"),
                        help="folder for the database, uploads and results (default: %(default)s)")
    parser.add_argument("--database", metavar="URL",
                        help="SQLAlchemy URL of a shared queue, e.g. postgresql+psycopg://user@host/mist "
                             "(default: SQLite in the data folder)")


def _limit_options(parser: argparse.ArgumentParser, whom: str) -> None:
    parser.add_argument("--max-upload-mb", type=float, default=200, help=f"largest upload of {whom} (default: "
                                                                        "%(default)s)")
    parser.add_argument("--max-images", type=int, default=100, help=f"most images per job of {whom} (default: "
                                                                    "%(default)s)")
    parser.add_argument("--max-queued", type=int, default=10, help=f"most jobs queued or running of {whom} "
                                                                   "(default: %(default)s)")


def run_serve(args: argparse.Namespace) -> int:
    try:
        from mist.faces.service.server import ServeOptions, serve, token_command
        from mist.faces.service.store import Limits
    except ImportError as exc:
        raise ValueError(f"mist serve needs the server's libraries ({exc.name} is missing): "
                         "pip install 'mist-protect[serve]'") from None
    if getattr(args, "serve_action", None) == "token":
        limits = Limits(int(args.max_upload_mb * _MB), args.max_images, args.max_queued) \
            if args.token_action == "create" else Limits()
        return token_command(args.token_action, args.data, args.database, getattr(args, "name", None), limits)
    check_device_option(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port: must be 1 to 65535, got {args.port}")
    if args.retention_hours <= 0:
        raise ValueError(f"--retention-hours: must be above 0, got {args.retention_hours}")
    work_limits = work_limits_from(args)
    options = ServeOptions(
        data=args.data, host=args.host, port=args.port, database=args.database, retention_hours=args.retention_hours,
        model=args.model, device=args.device, low_memory=args.low_memory, compile=args.compile, ray=args.ray,
        ray_resource=args.ray_resource, text_encoders=args.text_encoders,
        no_auth=args.no_auth, trusted_proxies=tuple(args.trusted_proxy),
        work_limits=work_limits,
        local_limits=Limits(int(args.max_upload_mb * _MB), args.max_images, args.max_queued))
    return serve(options)
