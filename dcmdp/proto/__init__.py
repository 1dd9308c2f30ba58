"""The wire schema (``dcmdp.proto``) and its generated Python code (``dcmdp_pb2``, ``dcmdp_pb2_grpc``).

The generated modules are committed; ``tests/test_proto.py`` checks they match the ``.proto``.
Regenerate with ``python -m dcmdp.proto.generate``.
"""
