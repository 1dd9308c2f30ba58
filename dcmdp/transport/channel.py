"""gRPC servers and channels as the trainer and the workers open them.

Limits (what a caller can make the server hold):

* the server **receives** at most ``max_receive`` bytes per message (default
  :data:`SERVER_RECEIVE_BYTES`, 4 MiB; the trainer raises it to what its largest legitimate
  request, a submission, can need); larger messages fail with RESOURCE_EXHAUSTED before a handler
  runs. It **sends** up to :data:`MAX_MESSAGE_BYTES` (weight chunks), which clients receive;
* at most ``max_concurrent_rpcs`` calls in flight (default 4 × threads); more are refused at once
  with RESOURCE_EXHAUSTED;
* at most :data:`MAX_STREAMS_PER_CONNECTION` concurrent calls per client connection (HTTP/2
  ``MAX_CONCURRENT_STREAMS``: the caller's further calls wait in its own channel);
* a call without the run token is refused before its body is read (``auth``).

TLS is optional: the server takes a certificate and key file, clients a CA file (the certificate
itself, when it is self-signed).
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Optional, Sequence

import grpc

from dcmdp.transport.auth import TokenAuthInterceptor, TokenClientInterceptor

MAX_MESSAGE_BYTES = 256 << 20  # a weight chunk (one bucket: 64 MiB by default, at most 128) plus framing, with room
SERVER_RECEIVE_BYTES = 4 << 20
MAX_STREAMS_PER_CONNECTION = 16

OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # notice a vanished peer within ~30 s even on an idle connection
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, int]] = [o for o in OPTIONS if o[0] != "grpc.max_receive_message_length"] + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),  # a port held by another process is an error, not a silent share
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} file {path}: {exc.strerror or exc}") from None


def make_server(token: str, *, max_workers: int = 16, on_reject=None,
                interceptors: Sequence[grpc.ServerInterceptor] = (), max_receive: int = SERVER_RECEIVE_BYTES,
                max_concurrent_rpcs: Optional[int] = None) -> grpc.Server:
    """A thread-pool server whose every RPC is checked for the run token first, with the limits
    above (``max_concurrent_rpcs`` None = 4 × ``max_workers``)."""
    options = SERVER_OPTIONS + [("grpc.max_receive_message_length", int(max_receive))]
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                       interceptors=[TokenAuthInterceptor(token, on_reject), *interceptors],
                       options=options, maximum_concurrent_rpcs=max_concurrent_rpcs or 4 * max_workers)


def bind(server: grpc.Server, host: str, port: int, *, tls_cert: Optional[str] = None,
         tls_key: Optional[str] = None) -> int:
    """Listen on host:port (port 0 = a free one); returns the port. TLS when cert and key are given."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls_cert:
            creds = grpc.ssl_server_credentials([(_read(tls_key, "key"), _read(tls_cert, "certificate"))])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot listen on {address} (port in use?)")
    return bound


def open_channel(target: str, token: str, *, tls_ca: Optional[str] = None,
                 server_name: Optional[str] = None) -> grpc.Channel:
    """A channel to ``target`` that sends the token with every call (TLS when ``tls_ca`` is given)."""
    options = list(OPTIONS)
    if tls_ca:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "CA")),
                                      options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, TokenClientInterceptor(token))
