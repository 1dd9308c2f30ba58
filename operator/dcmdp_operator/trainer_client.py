"""Read a trainer's progress through its ``GetStatus`` RPC (``dcmdp/proto/dcmdp.proto``).

The call carries the run's token (``authorization: Bearer <token>``), over TLS when the run asks
for it (``spec.tls``: the CA from the run's Secret, never a plaintext fallback). A trainer that is down, not
started yet, or slow never breaks a reconcile: :func:`get_status` returns ``(None, why)`` instead.
"""

from __future__ import annotations

from typing import Any, Optional

import grpc

from dcmdp.proto import dcmdp_pb2, dcmdp_pb2_grpc

def _scalars(msg: Any) -> dict[str, Any]:
    """Every scalar field of a message by its proto name; an ``optional`` field not set is None
    (the trainer does not know it yet: "auto, still calibrating" stays distinguishable from 0)."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        if f.message_type is None and not f.is_repeated:
            out[f.name] = getattr(msg, f.name) if not f.has_presence or msg.HasField(f.name) else None
    return out


def to_dict(msg: dcmdp_pb2.Status) -> dict[str, Any]:
    """A Status message as plain Python values (proto field names; ints stay ints; unknown None)."""
    out = _scalars(msg)
    out["pools"] = [_scalars(p) for p in msg.pools]
    out["workers"] = len(msg.workers)
    return out


def _channel(target: str, tls_ca: Optional[bytes], server_name: Optional[str]) -> grpc.aio.Channel:
    if tls_ca is None:
        return grpc.aio.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca), options=options)


async def get_status(
    target: str, token: str, timeout: float, *, tls_ca: Optional[bytes] = None, server_name: Optional[str] = None
) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(status dict, None) or (None, why it could not be read). ``tls_ca``: PEM CA certificates; when
    given the call goes over TLS, the trainer's certificate verified against them for
    ``server_name`` (default: the target's host)."""
    try:
        async with _channel(target, tls_ca, server_name) as channel:
            stub = dcmdp_pb2_grpc.TrainerStub(channel)
            reply = await stub.GetStatus(
                dcmdp_pb2.StatusRequest(header=dcmdp_pb2.Header()),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=timeout,
            )
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        name = code.name if code is not None else "UNKNOWN"
        return None, f"trainer status at {target}: {name}: {exc.details() or ''}".rstrip(": ")
    return to_dict(reply), None
