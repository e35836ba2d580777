"""What Envoy is told about ext_proc's decision: the metadata namespace it keeps and the access log that
prints it. Checked on the protobuf messages that go on the wire (build_snapshot)."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog
from envoy.extensions.access_loggers.stream.v3.stream_pb2 import StdoutAccessLog
from tests.unit.test_xds_resources import ext_proc_config, hcm, snapshot
from kvgate.wire import DECISION_NAMESPACE
from xds_server.settings import GatewaySettings


def test_the_ext_proc_filter_keeps_the_decision_namespace() -> None:
    # Without it Envoy silently drops everything ext_proc puts in the namespace.
    assert list(ext_proc_config(snapshot()).metadata_options.receiving_namespaces.untyped) == [DECISION_NAMESPACE]


@pytest.mark.parametrize(("path", "kind"), [(None, StdoutAccessLog), ("/var/log/kvgate/access.log", FileAccessLog)])
def test_one_json_access_log_line_per_request_with_the_decision_and_the_request_id(path: str | None,
                                                                                    kind: type) -> None:
    manager = hcm(snapshot(settings=GatewaySettings(access_log_path=path)))
    assert manager.always_set_request_id_in_response
    (log,) = manager.access_log
    config = kind()
    assert log.typed_config.Unpack(config)
    if path is not None:
        assert config.path == path
    fields = json_format.MessageToDict(config.log_format.json_format)
    assert fields["request_id"] == "%REQ(X-REQUEST-ID)%"
    assert fields[DECISION_NAMESPACE] == f"%DYNAMIC_METADATA({DECISION_NAMESPACE})%"
    assert {"status", "duration_ms", "upstream_host"} <= fields.keys()
