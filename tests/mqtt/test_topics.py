"""The MQTT names and dynamic-security commands, without a broker."""

from __future__ import annotations

from pulse.mqtt import dynsec, topics


def test_device_topics_parse_only_with_valid_ids() -> None:
    assert topics.parse("pulse/acme/dev-1/telemetry") == topics.DeviceTopic(
        "acme", "dev-1", "telemetry"
    )
    assert topics.parse("pulse/acme/dev-1/heartbeat") is not None
    for topic in ("pulse/acme/telemetry", "other/acme/d/telemetry", "pulse/ac me/d/telemetry",
                  "pulse/acme/d/x/telemetry", "pulse//d/telemetry"):  # fmt: skip
        assert topics.parse(topic) is None, topic


def test_every_process_shares_one_subscription_per_kind() -> None:
    assert topics.subscriptions() == [
        "$share/pulse/pulse/+/+/telemetry",
        "$share/pulse/pulse/+/+/heartbeat",
    ]


def test_usernames_name_a_device_of_a_tenant() -> None:
    assert topics.username("acme", "dev-1") == "acme/dev-1"
    assert topics.parse_username("acme/dev-1") == ("acme", "dev-1")
    assert topics.parse_username("pulse-admin") is None
    assert topics.parse_username("acme/dev/1") is None


def test_a_device_role_allows_its_own_topics_and_nothing_else() -> None:
    role = dynsec.device_role("acme", "dev-1")
    assert role["rolename"] == "pulse-device/acme/dev-1"
    assert {(acl["acltype"], acl["topic"]) for acl in role["acls"]} == {
        ("publishClientSend", "pulse/acme/dev-1/telemetry"),
        ("publishClientSend", "pulse/acme/dev-1/heartbeat"),
        ("subscribePattern", "pulse/acme/dev-1/errors"),
        ("publishClientReceive", "pulse/acme/dev-1/errors"),
    }
    assert all(acl["allow"] for acl in role["acls"])


def test_a_client_without_a_password_is_made_without_one() -> None:
    assert "password" not in dynsec.create_client("acme", "dev-1", None)
    assert dynsec.create_client("acme", "dev-1", "pdt_x")["password"] == "pdt_x"
