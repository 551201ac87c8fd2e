"""A moto server on loopback seeded with Fluidity's cloud resources, for tests that talk to AWS.

Real boto3 (and the real aws CLI) speak HTTP to ``moto.server.ThreadedMotoServer``; nothing
is patched. moto's gaps are filled by seeding what AWS would create on its own:

- an ECS service never starts tasks in moto, so ``FluidityCloud.seed_running_task`` runs
  one with ``group="service:fluidity-server"`` as the ECS scheduler would, and pins task
  status through moto's state-manager API (otherwise it advances on every describe);
- a task's network interface has no public IP in moto, so an Elastic IP is associated;
- ``run_task`` needs container-level memory and a VPC with DNS hostnames.

tests/conftest.py makes its fixtures available everywhere (fixtures ``moto_server``,
``cloud``, ``aws_env``); import its classes under ``TYPE_CHECKING`` so pytest loads it first.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from server.framing import (
    DEFAULT_CLUSTER_NAME,
    DEFAULT_SERVICE_NAME,
    METRIC_ACTIVE_CONNECTIONS,
    METRIC_ACTIVE_STREAMS,
    METRIC_LAST_ACTIVITY,
    METRICS_NAMESPACE,
    metric_dimensions,
)

REGION = "us-east-1"
TASK_FAMILY = "fluidity-server"
CONTAINER_NAME = "fluidity-server"
#: moto accepts any key pair while IAM enforcement is off.
DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"


@dataclass
class MotoEndpoint:
    """A running moto server and how to reach it."""

    url: str
    _clients: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def client(self, service: str, *, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET) -> Any:
        """A boto3 client for this server (cached: creating one loads the service model)."""
        key = (service, key_id, secret)
        if key not in self._clients:
            make_client: Callable[..., Any] = boto3.session.Session().client
            self._clients[key] = make_client(
                service,
                endpoint_url=self.url,
                region_name=REGION,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
            )
        return self._clients[key]

    def env(self, *, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET) -> dict[str, str]:
        """Environment variables that point boto3 and the aws CLI at this server, and only at it."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def post(self, path: str, body: bytes = b"", content_type: str = "text/plain") -> Any:
        """Call moto's own API (reset, state manager, IAM enforcement)."""
        request = urllib.request.Request(
            self.url + path, data=body, method="POST", headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            text = reply.read()
        return json.loads(text) if text else None

    def reset(self) -> None:
        """Forget every resource (moto also forgets state-manager pins, so pin again)."""
        self.post("/moto-api/reset")
        self.pin_task_status()

    def pin_task_status(self) -> None:
        """Keep ECS tasks in the status they were created with (moto advances them per describe)."""
        body = {"model_name": "ecs::task", "transition": {"progression": "manual", "times": 1_000_000}}
        self.post("/moto-api/state-manager/set-transition", json.dumps(body).encode(), "application/json")

    def enforce_iam(self, enabled: bool) -> None:
        """Make moto check every request's signature and IAM policies (or stop doing so)."""
        self.post("/moto-api/reset-auth", b"0" if enabled else b"inf")


@dataclass(frozen=True)
class SeededTask:
    task_arn: str
    eni_id: str
    public_ip: str | None


@dataclass
class FluidityCloud:
    """The resources the fluidity-fargate stack creates: VPC, cluster, task definition, service."""

    moto: MotoEndpoint
    vpc_id: str
    subnet_id: str
    security_group_id: str
    cluster: str = DEFAULT_CLUSTER_NAME
    service: str = DEFAULT_SERVICE_NAME

    @property
    def network_configuration(self) -> dict[str, Any]:
        return {
            "awsvpcConfiguration": {
                "subnets": [self.subnet_id],
                "securityGroups": [self.security_group_id],
                "assignPublicIp": "ENABLED",
            }
        }

    def describe_service(self) -> dict[str, Any]:
        reply = self.moto.client("ecs").describe_services(cluster=self.cluster, services=[self.service])
        service: dict[str, Any] = reply["services"][0]
        return service

    def set_desired_count(self, count: int) -> None:
        self.moto.client("ecs").update_service(cluster=self.cluster, service=self.service, desiredCount=count)

    def seed_running_task(self, *, public_ip: bool = True) -> SeededTask:
        """Start a task the way the ECS scheduler would for the service, with ENI and Elastic IP."""
        ecs, ec2 = self.moto.client("ecs"), self.moto.client("ec2")
        task = ecs.run_task(
            cluster=self.cluster,
            taskDefinition=TASK_FAMILY,
            launchType="FARGATE",
            networkConfiguration=self.network_configuration,
            startedBy="ecs-svc/fluidity",
            group=f"service:{self.service}",
        )["tasks"][0]
        details = {d["name"]: d["value"] for d in task["attachments"][0]["details"]}
        eni_id = details["networkInterfaceId"]
        address = None
        if public_ip:
            allocation = ec2.allocate_address(Domain="vpc")
            ec2.associate_address(AllocationId=allocation["AllocationId"], NetworkInterfaceId=eni_id)
            address = allocation["PublicIp"]
        return SeededTask(task["taskArn"], eni_id, address)

    def stop_task(self, task_arn: str) -> None:
        """What ECS does to the task after the desired count drops to zero."""
        self.moto.client("ecs").stop_task(cluster=self.cluster, task=task_arn, reason="scaled to zero")

    def put_metrics(
        self,
        *,
        at: float,
        connections: float | None = None,
        streams: float | None = None,
        last_activity: float | None = None,
    ) -> None:
        """Publish datapoints as the tunnel server does (namespace, names, Service dimension)."""
        moment = datetime.fromtimestamp(at, UTC)
        data = [
            {
                "MetricName": name,
                "Dimensions": metric_dimensions(self.service),
                "Timestamp": moment,
                "Value": float(value),
            }
            for name, value in (
                (METRIC_ACTIVE_CONNECTIONS, connections),
                (METRIC_ACTIVE_STREAMS, streams),
                (METRIC_LAST_ACTIVITY, last_activity),
            )
            if value is not None
        ]
        self.moto.client("cloudwatch").put_metric_data(Namespace=METRICS_NAMESPACE, MetricData=data)


def seed_fluidity(moto: MotoEndpoint, *, desired_count: int = 0) -> FluidityCloud:
    """Create the VPC, cluster, Fargate task definition and service (desired count as given)."""
    ec2, ecs = moto.client("ec2"), moto.client("ecs")
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group_id = ec2.create_security_group(
        GroupName="fluidity-server", Description="tunnel port", VpcId=vpc_id
    )["GroupId"]
    cloud = FluidityCloud(moto, vpc_id, subnet_id, group_id)
    ecs.create_cluster(clusterName=cloud.cluster)
    ecs.register_task_definition(
        family=TASK_FAMILY,
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="512",
        containerDefinitions=[
            {
                "name": CONTAINER_NAME,
                "image": "fluidity-server:latest",
                "memory": 512,  # moto's run_task needs container-level memory
                "portMappings": [{"containerPort": 8443, "protocol": "tcp"}],
                "essential": True,
            }
        ],
    )
    ecs.create_service(
        cluster=cloud.cluster,
        serviceName=cloud.service,
        taskDefinition=TASK_FAMILY,
        desiredCount=0,
        launchType="FARGATE",
        networkConfiguration=cloud.network_configuration,
    )
    if desired_count:
        cloud.set_desired_count(desired_count)
    return cloud


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoEndpoint]:
    """One moto server on 127.0.0.1 for the module (moto keeps its state per process)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = MotoEndpoint(f"http://{host}:{port}")
    try:
        yield endpoint
    finally:
        endpoint.enforce_iam(False)
        server.stop()


@pytest.fixture
def cloud(moto_server: MotoEndpoint) -> FluidityCloud:
    """A fresh moto with the Fluidity resources, service scaled to zero."""
    moto_server.reset()
    return seed_fluidity(moto_server)


@pytest.fixture
def aws_env(moto_server: MotoEndpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process's AWS settings (boto3 reads os.environ) at the moto server."""
    env = moto_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    return env
