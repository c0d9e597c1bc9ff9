"""grpc.health.v1 and server reflection through a real channel, as grpcurl uses them."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_health_check_per_service(wan_server):
    with grpc.insecure_channel(wan_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "diffserve.v1.GenerationService", "diffserve.v1.GenerationService/tiny-wan"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == serving, service
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            raise AssertionError("unknown service must be NOT_FOUND")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == serving
        watch.cancel()


def test_reflection_lists_and_describes_services(wan_server):
    with grpc.insecure_channel(wan_server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"diffserve.v1.GenerationService", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        service = pool.FindServiceByName("diffserve.v1.GenerationService")
        assert {m.name for m in service.methods} == {
            "SubmitJob", "Generate", "StreamJobEvents", "GetJob", "CancelJob", "ListModels", "DownloadArtifact"}
        assert pool.FindMessageTypeByName("diffserve.v1.GenerationParams").fields_by_name["num_frames"]
