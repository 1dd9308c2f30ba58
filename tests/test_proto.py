"""The committed generated code is current with dcmdp.proto."""

from pathlib import Path

from dcmdp.proto import dcmdp_pb2
from dcmdp.proto.generate import HERE, generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    for fresh in generate(tmp_path):
        committed = HERE / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed: run python -m dcmdp.proto.generate"
        assert committed.read_text() == fresh.read_text(), (
            f"{fresh.name} is out of date with dcmdp.proto: run python -m dcmdp.proto.generate"
        )


def test_every_message_with_a_header_round_trips() -> None:
    msg = dcmdp_pb2.Lease(lease_id="l1", prompts=[dcmdp_pb2.Prompt(index=3, token_ids=[1, 2])])
    msg.header.weight_version = 7
    msg.header.pool = "bf16"
    back = dcmdp_pb2.Lease.FromString(msg.SerializeToString())
    assert back.header.weight_version == 7 and back.header.pool == "bf16"
    assert list(back.prompts[0].token_ids) == [1, 2]


def test_optional_status_fields_keep_the_wire_format() -> None:
    """proto3 ``optional`` changes no byte of a set field: field 9 (was ``lambda``, now
    ``run_lambda``) is still tag 0x49 + a little-endian double, readable by an older peer; an
    unset field is absent (an older peer reads 0, as before)."""
    assert dcmdp_pb2.Status(run_lambda=0.25).SerializeToString() == bytes.fromhex("49" + "000000000000d03f")
    assert dcmdp_pb2.Status(tolerance=None).SerializeToString() == b""
    msg = dcmdp_pb2.Status.FromString(bytes.fromhex("51" + "000000000000d03f"))  # field 10: tolerance
    assert msg.HasField("tolerance") and msg.tolerance == 0.25 and not msg.HasField("run_lambda")
