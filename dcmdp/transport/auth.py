"""The per-run token: where it comes from, how the server checks it and how clients send it.

Every RPC carries ``authorization: Bearer <token>`` in its metadata. The server rejects a call
without it, or with another token, with ``UNAUTHENTICATED`` before the handler runs. The token is
read from a file (the operator mounts it from a Secret) or an environment variable:
``--token-file`` > ``$DCMDP_TOKEN_FILE`` > ``$DCMDP_TOKEN``.
"""

from __future__ import annotations

import collections
import hmac
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import grpc

METADATA_KEY = "authorization"


class TokenError(ValueError):
    """No usable run token: the message says where one was looked for."""


def load_token(token_file: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if env is None else env
    path = token_file or env.get("DCMDP_TOKEN_FILE")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise TokenError(f"cannot read the run token file {path}: {exc.strerror or exc}") from None
        if not token:
            raise TokenError(f"the run token file {path} is empty")
        return token
    token = (env.get("DCMDP_TOKEN") or "").strip()
    if token:
        return token
    raise TokenError("no run token: pass --token-file FILE, or set DCMDP_TOKEN_FILE or DCMDP_TOKEN")


def bearer(token: str) -> tuple[str, str]:
    return (METADATA_KEY, f"Bearer {token}")


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects every call whose bearer token is missing or wrong (constant-time comparison)."""

    def __init__(self, token: str, on_reject: Optional[Callable[[str, str], None]] = None):
        if not token:
            raise TokenError("the server needs a non-empty run token")
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        got = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                got = value if isinstance(value, str) else value.decode(errors="replace")
        if got is not None and hmac.compare_digest(got.encode(), self._expected):
            return continuation(handler_call_details)
        reason = "missing run token" if got is None else "wrong run token"
        if self._on_reject:
            self._on_reject(handler_call_details.method, reason)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(request_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason} (send 'authorization: Bearer <token>')")

        # A request-streaming handler that never reads its requests: the body of a rejected call is
        # neither parsed nor even received (beyond the HTTP/2 flow-control window).
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(deny, response_serializer=handler.response_serializer)


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every outgoing call of a channel."""

    def __init__(self, token: str):
        self._pair = bearer(token)

    def _with_token(self, d):
        metadata = [m for m in (d.metadata or ()) if m[0] != METADATA_KEY] + [self._pair]
        return _Details(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None),
                        getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)
