"""Container healthcheck of `diffserve serve` (Dockerfile HEALTHCHECK, docker-compose.yml).

    python deploy/healthcheck.py [--grpc HOST:PORT] [--http URL] [--timeout SECONDS]

Exit 0 when every check given passes: the standard gRPC health service answers SERVING (the
scheduler says so once a worker group has loaded its model, and NOT_SERVING while it drains), and
GET URL (the HTTP API's /health) answers 200 (it answers 503 otherwise). Exit 1 with one line on
stderr otherwise. Neither check needs a bearer token. Plain gRPC and HTTP only: a scheduler serving
gRPC over TLS (--tls-cert) needs its own check.

Imports only grpcio and its health stubs (no torch, no diffserve client: the client's retry and
wait-for-ready settings must not stretch a probe past its timeout).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def grpc_problem(target: str, timeout_s: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as err:
            return f"gRPC health at {target}: {err.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return "" if status == "SERVING" else f"gRPC health at {target}: {status}"


def http_problem(url: str, timeout_s: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            status = reply.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        return f"GET {url}: {getattr(err, 'reason', err)}"
    return "" if status == 200 else f"GET {url}: HTTP {status}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc", default="", metavar="HOST:PORT", help="check gRPC health there")
    parser.add_argument("--http", default="", metavar="URL", help="check that GET URL answers 200")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default 3)")
    args = parser.parse_args(argv)
    if not (args.grpc or args.http):
        parser.error("give --grpc, --http or both")
    problems = [p for p in (args.grpc and grpc_problem(args.grpc, args.timeout), args.http and http_problem(args.http, args.timeout)) if p]
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
