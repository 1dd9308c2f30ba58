"""What the trainer and the rollout workers share on the wire, besides the ``.proto``.

* ``auth``: the per-run token (file or env), the server interceptor that rejects calls without it
  (UNAUTHENTICATED) and the client interceptor that adds it to every call;
* ``channel``: gRPC servers and channels with raised message limits, optional TLS;
* ``tensors``: weight snapshots as one flat byte stream (cast to a wire dtype, with a manifest of
  names/shapes/dtypes/offsets and a sha256) and back, plus the per-chunk crc32.

Both the trainer (``dcmdp_trainer``) and the workers (``dcmdp_rollout``) import these; they never
import each other.
"""
