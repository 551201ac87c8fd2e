"""fluidity-deploy against moto on loopback: real boto3 and the real aws CLI, nothing patched.

One deployment (region us-east-1) is made per module and inspected read-only; tests that
change things deploy into a region of their own, so they never disturb it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from cloud_fixtures import REGION, MotoEndpoint

from lambdas import deploy as fd
from lambdas.packaging import DEPLOY_TOOLING, FIXED_ZIP_TIME, PackagingError, build_bundle

pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: What the Lambda Python runtime provides besides the standard library (botocore also imports
#: certifi when it is installed, and falls back to its own CA bundle when not).
LAMBDA_RUNTIME_PACKAGES = {
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "dateutil",
    "urllib3",
    "six",
    "certifi",
}


@dataclass
class CliRun:
    returncode: int
    out: str
    err: str


def run_cli(argv: Sequence[str]) -> CliRun:
    """``fluidity-deploy`` in this process (so boto3 talks to moto through os.environ)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = fd.main(list(argv))
    return CliRun(returncode, out.getvalue(), err.getvalue())


def deploy_args(region: str | None = None, *extra: str) -> list[str]:
    args = ["deploy", "--poll-interval", "0", *extra]
    return args + (["--region", region] if region else [])


_CLIENTS: dict[tuple[str, str], Any] = {}


def client(service: str, region: str = REGION) -> Any:
    """A boto3 client for moto (cached: creating one loads the service model, which is slow)."""
    if (service, region) not in _CLIENTS:
        make_client: Callable[..., Any] = boto3.session.Session().client
        _CLIENTS[service, region] = make_client(service, region_name=region)
    return _CLIENTS[service, region]


def stack_outputs(name: str, region: str = REGION) -> dict[str, str]:
    return fd.stack_outputs(client("cloudformation", region).describe_stacks(StackName=name)["Stacks"][0])


@pytest.fixture(scope="module")
def aws(moto_server: MotoEndpoint) -> Iterator[MotoEndpoint]:
    """This process's AWS settings point at a freshly reset moto server."""
    moto_server.reset()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in moto_server.env().items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
            patch.delenv(name, raising=False)
        yield moto_server
    moto_server.reset()  # moto's state is per process: leave nothing for the next module


@pytest.fixture(scope="module")
def deployed(aws: MotoEndpoint) -> CliRun:
    run = run_cli(deploy_args())
    assert run.returncode == 0, run.err
    return run


def cli_env(moto: MotoEndpoint) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **moto.env()}


def aws_cli(moto: MotoEndpoint, *args: str) -> str:
    """The runbook's command, run by the real aws CLI against moto."""
    result = subprocess.run(
        [str(BIN / "aws"), *args], capture_output=True, text=True, env=cli_env(moto), timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def fill_moto_delete_gaps(region: str) -> None:
    """Do the deletion steps AWS CloudFormation performs itself but moto 5.2.5's does not.

    moto deletes neither a managed policy's role attachment, nor the internet gateway's VPC
    attachment, nor a route table, so without these calls the role and the VPC cannot go.
    """
    iam, ec2 = client("iam", region), client("ec2", region)
    for role in iam.list_roles()["Roles"]:
        if role["RoleName"].startswith(f"{fd.LAMBDA_STACK}-"):
            for policy in iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]:
                iam.detach_role_policy(RoleName=role["RoleName"], PolicyArn=policy["PolicyArn"])
    vpc = stack_outputs(fd.FARGATE_STACK, region)["VpcId"]
    vpc_filter = [{"Name": "vpc-id", "Values": [vpc]}]
    for gateway in ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])[
        "InternetGateways"
    ]:
        ec2.detach_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"], VpcId=vpc)
    for table in ec2.describe_route_tables(Filters=vpc_filter)["RouteTables"]:
        if any(a.get("Main") for a in table["Associations"]):
            continue
        for association in table["Associations"]:
            ec2.disassociate_route_table(AssociationId=association["RouteTableAssociationId"])
        ec2.delete_route_table(RouteTableId=table["RouteTableId"])


# ----------------------------------------------------------------------------- deploy into moto


def test_deploy_creates_fargate_then_lambda_with_a_line_per_stack_event(deployed: CliRun) -> None:
    lines = deployed.out.splitlines()
    fargate_done = lines.index("  CREATE_COMPLETE  AWS::CloudFormation::Stack  fluidity-fargate")
    lambda_done = lines.index("  CREATE_COMPLETE  AWS::CloudFormation::Stack  fluidity-lambda")
    assert lines.index("Creating stack fluidity-fargate") < fargate_done
    assert fargate_done < lines.index("Creating stack fluidity-lambda") < lambda_done
    assert any(line.startswith("Uploading Lambda code to s3://fluidity-lambda-code-") for line in lines)
    assert "fluidity-lambda outputs:" in lines


def test_fargate_stack_in_moto(deployed: CliRun) -> None:
    ecs, logs, ecr, ec2 = client("ecs"), client("logs"), client("ecr"), client("ec2")
    (cluster,) = ecs.describe_clusters(clusters=["fluidity"])["clusters"]
    assert cluster["status"] == "ACTIVE"
    # moto's CloudFormation drops the service's LaunchType and NetworkConfiguration and the task
    # definition's Cpu, NetworkMode and roles; tests/test_cloudformation.py checks those.
    (service,) = ecs.describe_services(cluster="fluidity", services=["fluidity-server"])["services"]
    assert service["desiredCount"] == 0
    task = ecs.describe_task_definition(taskDefinition="fluidity-server")["taskDefinition"]
    assert task["memory"] == "512"
    (container,) = task["containerDefinitions"]
    assert container["portMappings"][0]["containerPort"] == 8443
    assert container["stopTimeout"] == 30
    assert {s["name"] for s in container["secrets"]} == {
        "FLUIDITY_CA_CERT_PEM",
        "FLUIDITY_SERVER_CERT_PEM",
        "FLUIDITY_SERVER_KEY_PEM",
    }
    assert container["logConfiguration"]["options"]["awslogs-group"] == "/fluidity/server"
    (group,) = logs.describe_log_groups(logGroupNamePrefix="/fluidity/server")["logGroups"]
    assert group["retentionInDays"] == 14
    (repository,) = ecr.describe_repositories(repositoryNames=["fluidity-server"])["repositories"]
    outputs = stack_outputs(fd.FARGATE_STACK)
    assert outputs["RepositoryUri"] == repository["repositoryUri"]
    assert container["image"] == f"{repository['repositoryUri']}:latest"
    (group_rules,) = ec2.describe_security_groups(GroupIds=[outputs["SecurityGroupId"]])["SecurityGroups"]
    assert [
        (p["FromPort"], p["ToPort"], p["IpRanges"][0]["CidrIp"]) for p in group_rules["IpPermissions"]
    ] == [(8443, 8443, "0.0.0.0/0")]
    (subnet,) = ec2.describe_subnets(SubnetIds=[outputs["SubnetId"]])["Subnets"]
    assert subnet["VpcId"] == outputs["VpcId"]
    # The subnet's association is not modelled by moto's CloudFormation; the route is.
    resources = client("cloudformation").list_stack_resources(StackName=fd.FARGATE_STACK)[
        "StackResourceSummaries"
    ]
    table_id = next(
        r["PhysicalResourceId"] for r in resources if r["LogicalResourceId"] == "PublicRouteTable"
    )
    (public,) = ec2.describe_route_tables(RouteTableIds=[table_id])["RouteTables"]
    assert public["VpcId"] == outputs["VpcId"]
    assert any(
        r.get("GatewayId", "").startswith("igw-") and r["DestinationCidrBlock"] == "0.0.0.0/0"
        for r in public["Routes"]
    )
    assert {"ClusterName", "ServiceName", "RepositoryUri", "SecurityGroupId", "SubnetId"} <= set(outputs)


def test_lambda_stack_in_moto(deployed: CliRun) -> None:
    lam, events, apigw, logs = client("lambda"), client("events"), client("apigateway"), client("logs")
    for name, handler in (
        ("fluidity-wake", "wake_handler"),
        ("fluidity-status", "status_handler"),
        ("fluidity-kill", "kill_handler"),
        ("fluidity-sleep", "sleep_handler"),
    ):
        config = lam.get_function_configuration(FunctionName=name)
        assert (config["Runtime"], config["Handler"]) == ("python3.12", f"lambdas.handlers.{handler}")
        env = config["Environment"]["Variables"]
        assert (env["CLUSTER_NAME"], env["SERVICE_NAME"], env["IDLE_THRESHOLD"]) == (
            "fluidity",
            "fluidity-server",
            "10m",
        )
        assert (env["TUNNEL_PORT"], env["METRICS_NAMESPACE"]) == ("8443", "Fluidity")
        (group,) = logs.describe_log_groups(logGroupNamePrefix=f"/aws/lambda/{name}")["logGroups"]
        assert group["retentionInDays"] == 14
    rule = events.describe_rule(Name="fluidity-sleep-schedule")
    assert (rule["ScheduleExpression"], rule["State"]) == ("rate(5 minutes)", "ENABLED")
    (target,) = events.list_targets_by_rule(Rule="fluidity-sleep-schedule")["Targets"]
    assert target["Arn"] == lam.get_function_configuration(FunctionName="fluidity-sleep")["FunctionArn"]
    (api,) = [a for a in apigw.get_rest_apis()["items"] if a["name"] == "fluidity-api"]
    paths = {r["path"]: r for r in apigw.get_resources(restApiId=api["id"])["items"]}
    assert {"/wake", "/status", "/kill"} <= set(paths)
    for path, verb in (("/wake", "POST"), ("/status", "GET"), ("/kill", "POST")):
        method = apigw.get_method(restApiId=api["id"], resourceId=paths[path]["id"], httpMethod=verb)
        assert method["apiKeyRequired"] is True
        assert method["methodIntegration"]["type"] == "AWS_PROXY"
        assert f"function:fluidity{path.replace('/', '-')}/invocations" in method["methodIntegration"]["uri"]
    dashboards = client("cloudwatch").list_dashboards()["DashboardEntries"]
    assert [d["DashboardName"] for d in dashboards] == ["fluidity"]


def test_lambda_role_policy_is_attached_and_scoped_to_the_service(deployed: CliRun) -> None:
    iam = client("iam")
    role_arn = client("lambda").get_function_configuration(FunctionName="fluidity-wake")["Role"]
    role_name = role_arn.rsplit("/", 1)[1]
    (attached,) = iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]
    policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
    document = iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=policy["DefaultVersionId"])[
        "PolicyVersion"
    ]["Document"]
    document = json.loads(document) if isinstance(document, str) else document
    scale = next(s for s in document["Statement"] if s["Sid"] == "ScaleAndDescribeService")
    assert scale["Resource"] == "arn:aws:ecs:us-east-1:123456789012:service/fluidity/fluidity-server"


def test_outputs_are_the_runbooks_and_usable_as_printed(deployed: CliRun) -> None:
    outputs = stack_outputs(fd.LAMBDA_STACK)
    assert set(outputs) == {"ApiGatewayUrl", "ApiKeyId", "DashboardURL", "AlarmNotificationTopicArn"}
    (api,) = [a for a in client("apigateway").get_rest_apis()["items"] if a["name"] == "fluidity-api"]
    assert outputs["ApiGatewayUrl"] == f"https://{api['id']}.execute-api.us-east-1.amazonaws.com/prod"
    parameters = fd.stack_parameter_values(
        client("cloudformation").describe_stacks(StackName="fluidity-lambda")["Stacks"][0]
    )
    assert outputs["ApiKeyId"] == parameters["ApiKeyValue"]
    assert len(outputs["ApiKeyId"]) == fd.API_KEY_LENGTH and outputs["ApiKeyId"].isalnum()
    assert outputs["DashboardURL"].endswith("#dashboards:name=fluidity")
    topics = [t["TopicArn"] for t in client("sns").list_topics()["Topics"]]
    assert outputs["AlarmNotificationTopicArn"] in topics
    for key, value in outputs.items():
        assert f"  {key}" in deployed.out and value in deployed.out


def test_runbook_aws_cli_commands_show_what_the_runbook_promises(deployed: CliRun, aws: MotoEndpoint) -> None:
    commands = {
        "env": ["lambda", "get-function-configuration", "--function-name", "fluidity-wake",
                "--query", "Environment.Variables", "--output", "json"],
        "size": ["ecs", "describe-task-definition", "--task-definition", "fluidity-server",
                 "--query", "taskDefinition.[cpu,memory]", "--output", "text"],
        "service": ["ecs", "describe-services", "--cluster", "fluidity", "--services", "fluidity-server",
                    "--query", "services[0].[status,runningCount,desiredCount]", "--output", "text"],
        "rule": ["events", "describe-rule", "--name", "fluidity-sleep-schedule"],
        **{key: ["cloudformation", "describe-stacks", "--stack-name", "fluidity-lambda",
                 "--query", f"Stacks[0].Outputs[?OutputKey==`{key}`].OutputValue", "--output", "text"]
           for key in ("ApiGatewayUrl", "ApiKeyId")},
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {name: pool.submit(aws_cli, aws, *args) for name, args in commands.items()}
        shown = {name: future.result() for name, future in futures.items()}
    variables = json.loads(shown["env"])
    assert (variables["CLUSTER_NAME"], variables["SERVICE_NAME"]) == ("fluidity", "fluidity-server")
    assert (
        shown["size"].split()[1] == "512"
    )  # moto's CloudFormation drops Cpu; the template test checks "256"
    assert shown["service"].split() == ["ACTIVE", "0", "0"]
    assert json.loads(shown["rule"])["ScheduleExpression"] == "rate(5 minutes)"
    outputs = stack_outputs(fd.LAMBDA_STACK)
    # The runbook's wake call is `curl -X POST "$API_URL/wake" -H "x-api-key: $API_KEY"`.
    assert shown["ApiGatewayUrl"] == outputs["ApiGatewayUrl"] and shown["ApiGatewayUrl"].endswith("/prod")
    assert shown["ApiKeyId"] == outputs["ApiKeyId"]


def test_outputs_command_through_the_installed_entry_point(deployed: CliRun, aws: MotoEndpoint) -> None:
    result = subprocess.run(
        [str(BIN / "fluidity-deploy"), "outputs", "--json"],
        capture_output=True,
        text=True,
        env=cli_env(aws),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    assert outputs[fd.LAMBDA_STACK] == stack_outputs(fd.LAMBDA_STACK)
    assert outputs[fd.FARGATE_STACK]["ClusterName"] == "fluidity"


def test_readiness_notes_name_the_missing_image_and_certificates(deployed: CliRun) -> None:
    assert "fluidity-deploy secrets --cert-dir certs" in deployed.out
    assert "docker push 123456789012.dkr.ecr.us-east-1.amazonaws.com/fluidity-server:latest" in deployed.out


# ----------------------------------------------------------------------------- update, destroy


def test_redeploy_keeps_the_api_key_and_settings_and_skips_unchanged_code(aws: MotoEndpoint) -> None:
    region = "eu-west-1"
    first = run_cli(deploy_args(region, "--allowed-cidr", "198.51.100.7/32", "--idle-threshold", "15m"))
    assert first.returncode == 0, first.err
    key = stack_outputs(fd.LAMBDA_STACK, region)["ApiKeyId"]

    again = run_cli(deploy_args(region))
    assert again.returncode == 0, again.err
    assert "Updating stack fluidity-fargate" in again.out and "Updating stack fluidity-lambda" in again.out
    assert "is up to date" in again.out  # same code, same content-addressed key: no upload
    assert stack_outputs(fd.LAMBDA_STACK, region)["ApiKeyId"] == key
    lam = client("lambda", region).get_function_configuration(FunctionName="fluidity-sleep")
    assert lam["Environment"]["Variables"]["IDLE_THRESHOLD"] == "15m"
    group_id = stack_outputs(fd.FARGATE_STACK, region)["SecurityGroupId"]
    (group,) = client("ec2", region).describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == "198.51.100.7/32"

    rotated = run_cli(deploy_args(region, "--api-key", "A" * 32))
    assert rotated.returncode == 0, rotated.err
    assert stack_outputs(fd.LAMBDA_STACK, region)["ApiKeyId"] == "A" * 32


def test_destroy_deletes_lambda_then_fargate_keeps_the_image_repository(aws: MotoEndpoint) -> None:
    region = "eu-central-1"
    assert run_cli(deploy_args(region)).returncode == 0
    bucket = fd.default_bucket_name("123456789012", region)
    fill_moto_delete_gaps(region)

    run = run_cli(["destroy", "--yes", "--poll-interval", "0", "--region", region])

    assert run.returncode == 0, run.err
    lines = run.out.splitlines()
    lambda_gone = lines.index("  DELETE_COMPLETE  AWS::CloudFormation::Stack  fluidity-lambda")
    assert (
        lines.index("Deleting stack fluidity-lambda")
        < lambda_gone
        < lines.index("Deleting stack fluidity-fargate")
    )
    assert "  DELETE_COMPLETE  AWS::CloudFormation::Stack  fluidity-fargate" in lines
    cfn = client("cloudformation", region)
    assert (
        fd.describe_stack(cfn, fd.LAMBDA_STACK) is None and fd.describe_stack(cfn, fd.FARGATE_STACK) is None
    )
    assert f"Deleted S3 bucket {bucket}" in lines
    assert bucket not in [b["Name"] for b in client("s3", region).list_buckets()["Buckets"]]
    assert "aws ecr delete-repository --repository-name fluidity-server --force" in run.out
    client("ecr", region).describe_repositories(repositoryNames=["fluidity-server"])  # retained

    # Deploying again adopts the kept repository (its images stay usable) instead of failing on it.
    again = run_cli(deploy_args(region))
    assert again.returncode == 0, again.err
    assert "Reusing the existing ECR repository fluidity-server" in again.out
    assert stack_outputs(fd.FARGATE_STACK, region)["RepositoryUri"].endswith(
        f".dkr.ecr.{region}.amazonaws.com/fluidity-server"
    )
    # The runbook's optional clean-up then works.
    client("ecr", region).delete_repository(repositoryName="fluidity-server", force=True)


def test_log_export_bucket_takes_the_runbooks_log_backup(aws: MotoEndpoint) -> None:
    region = "ca-central-1"
    run = run_cli(deploy_args(region, "--log-export-bucket", "fluidity-logs"))
    assert run.returncode == 0, run.err
    assert stack_outputs(fd.FARGATE_STACK, region)["LogExportBucket"] == "fluidity-logs"
    s3 = client("s3", region)  # moto 5.2.5 skips the bucket policy; the template test checks it
    assert s3.get_bucket_tagging(Bucket="fluidity-logs")["TagSet"] == [
        {"Key": "fluidity:purpose", "Value": "log-export"}
    ]

    # The runbook's "Backup logs" command, as written, by the real aws CLI.
    env_region = {"AWS_DEFAULT_REGION": region, "AWS_REGION": region}
    result = subprocess.run(
        ["bash", "-c", "aws logs create-export-task --log-group-name /aws/lambda/fluidity-wake --from 0 "
         "--to $(date +%s)000 --destination fluidity-logs --destination-prefix backup/"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**cli_env(aws), **env_region, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["taskId"]
    assert s3.list_objects_v2(Bucket="fluidity-logs")["KeyCount"] >= 1  # CloudWatch Logs' write check


def test_without_the_option_no_log_export_bucket_is_made(deployed: CliRun) -> None:
    assert "LogExportBucket" not in stack_outputs(fd.FARGATE_STACK)
    stack = fd.describe_stack(client("cloudformation"), fd.FARGATE_STACK)
    assert fd.stack_parameter_values(stack)["LogExportBucketName"] == ""  # the bucket's condition is off


def test_destroy_when_nothing_is_deployed_says_so(aws: MotoEndpoint) -> None:
    run = run_cli(["destroy", "--yes", "--poll-interval", "0", "--region", "ap-south-1"])
    assert run.returncode == 0, run.err
    assert "Stack fluidity-lambda does not exist; nothing to delete" in run.out
    assert "Stack fluidity-fargate does not exist; nothing to delete" in run.out


def test_destroy_without_confirmation_deletes_nothing(deployed: CliRun) -> None:
    run = run_cli(["destroy", "--poll-interval", "0"])  # stdin is not a terminal: no prompt, no deletion
    assert run.returncode == 1
    assert "pass --yes" in run.err
    assert fd.describe_stack(client("cloudformation"), fd.LAMBDA_STACK) is not None


def test_outputs_when_nothing_is_deployed_is_a_clear_error(aws: MotoEndpoint) -> None:
    run = run_cli(["outputs", "--region", "ap-northeast-1"])
    assert run.returncode == 1
    assert "neither fluidity-fargate nor fluidity-lambda is deployed" in run.err


# ----------------------------------------------------------------------------- secrets


def test_secrets_are_stored_as_secure_strings_the_task_definition_reads(pki: Any, aws: MotoEndpoint) -> None:
    region = "us-west-2"
    run = run_cli(["secrets", "--cert-dir", str(pki.dir), "--region", region])
    assert run.returncode == 0, run.err
    ssm = client("ssm", region)
    for filename, suffix in fd.CERT_PARAMETERS.items():
        parameter = ssm.get_parameter(Name=f"/fluidity/tls/{suffix}", WithDecryption=True)["Parameter"]
        assert parameter["Type"] == "SecureString"
        assert parameter["Value"] == (pki.dir / filename).read_text()
    aws_session = fd.Aws(boto3.session.Session(), region)
    notes = fd.readiness_warnings(aws_session, {"ServiceName": "fluidity-server"}, "latest")
    assert not any("TLS" in note for note in notes)


def test_secrets_with_a_missing_file_store_nothing(pki: Any, tmp_path: Path, aws: MotoEndpoint) -> None:
    region = "sa-east-1"
    for name in ("ca.crt", "server.crt"):
        shutil.copy(pki.dir / name, tmp_path / name)
    run = run_cli(["secrets", "--cert-dir", str(tmp_path), "--region", region])
    assert run.returncode == 1
    assert f"{tmp_path / 'server.key'} not found" in run.err
    assert f"fluidity-certs init --dir {tmp_path}" in run.err
    assert client("ssm", region).describe_parameters()["Parameters"] == []


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("server.key", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n", "is encrypted"),
        ("server.crt", "hello\n", "is not a PEM certificate"),
        ("server.key", "-----BEGIN CERTIFICATE-----\n", "is not a PEM private key"),
    ],
)
def test_secrets_reject_bad_files(
    pki: Any, tmp_path: Path, filename: str, content: str, message: str
) -> None:
    for name in fd.CERT_PARAMETERS:
        shutil.copy(pki.dir / name, tmp_path / name)
    (tmp_path / filename).write_text(content)
    with pytest.raises(fd.DeployError, match=message):
        fd.read_certificates(tmp_path)


# ----------------------------------------------------------------------------- clear errors


def test_no_credentials_is_a_clear_error(aws: MotoEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for argv in (deploy_args(), ["outputs"]):
        run = run_cli(argv)
        assert run.returncode == 1
        assert "no AWS credentials found" in run.err
        assert "Traceback" not in run.err


def test_unknown_profile_is_a_clear_error(aws: MotoEndpoint) -> None:
    run = run_cli(["outputs", "--profile", "no-such-profile"])
    assert run.returncode == 1
    assert "no-such-profile" in run.err and "aws configure list-profiles" in run.err


def test_missing_region_is_a_clear_error(aws: MotoEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    run = run_cli(["outputs"])
    assert run.returncode == 1
    assert "no AWS region" in run.err


def test_region_comes_from_flag_then_aws_region_then_aws_default_region() -> None:
    env = {"AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "eu-north-1"}
    assert fd.resolve_region("ap-east-1", env, "us-east-2") == "ap-east-1"
    assert fd.resolve_region(None, env, "us-east-2") == "eu-west-3"
    assert fd.resolve_region(None, {"AWS_DEFAULT_REGION": "eu-north-1"}, "us-east-2") == "eu-north-1"
    assert fd.resolve_region(None, {}, "us-east-2") == "us-east-2"
    assert fd.resolve_region(None, {}, None) is None


def test_missing_handlers_stop_the_deploy_before_any_aws_call(tmp_path: Path) -> None:
    (tmp_path / "lambdas").mkdir()
    aws_session = fd.Aws(boto3.session.Session(), "us-east-1")  # never used: packaging fails first
    with pytest.raises(fd.DeployError, match=r"handlers\.py is missing"):
        fd.deploy(aws_session, fd.DeployOptions(source_root=tmp_path), io.StringIO(), fd.Waiting())


def aws_event(
    event_id: str, logical_id: str, kind: str, status: str, reason: str | None = None
) -> dict[str, str]:
    event = {
        "EventId": event_id,
        "LogicalResourceId": logical_id,
        "ResourceType": kind,
        "ResourceStatus": status,
    }
    return event | ({"ResourceStatusReason": reason} if reason else {})


def test_rolled_back_stack_reasons_name_the_failed_resource() -> None:
    """Events as AWS returns them (newest first) for a create that failed and rolled back."""
    stack, cluster, repository = "AWS::CloudFormation::Stack", "AWS::ECS::Cluster", "AWS::ECR::Repository"
    exists = "Resource of type 'AWS::ECR::Repository' with identifier 'fluidity-server' already exists."
    events = [
        aws_event("6", "fluidity-fargate", stack, "ROLLBACK_COMPLETE"),
        aws_event("5", "Cluster", cluster, "DELETE_COMPLETE"),
        aws_event("4", "fluidity-fargate", stack, "ROLLBACK_IN_PROGRESS",
                  "The following resource(s) failed to create: [Repository]."),
        aws_event("3", "Cluster", cluster, "CREATE_FAILED", "Resource creation cancelled"),
        aws_event("2", "Repository", repository, "CREATE_FAILED", exists),
    ]  # fmt: skip
    assert fd.failure_reasons(events) == [
        "Repository (AWS::ECR::Repository): Resource of type 'AWS::ECR::Repository' with identifier "
        "'fluidity-server' already exists."
    ]
    assert fd.format_event(events[4]).startswith(
        "  CREATE_FAILED  AWS::ECR::Repository  Repository  (Resource"
    )
    assert fd.format_event(events[1]) == "  DELETE_COMPLETE  AWS::ECS::Cluster  Cluster"


def test_no_updates_is_recognised_and_other_validation_errors_are_not() -> None:
    def validation(message: str) -> botocore.exceptions.ClientError:
        return botocore.exceptions.ClientError(
            {"Error": {"Code": "ValidationError", "Message": message}}, "UpdateStack"
        )

    assert fd.is_no_update_error(validation("No updates are to be performed."))
    assert not fd.is_no_update_error(validation("Template format error: unresolved resource dependency"))


def test_update_parameters_keep_current_values_unless_given() -> None:
    existing = {"Parameters": [{"ParameterKey": "AllowedCidr", "ParameterValue": "198.51.100.7/32"},
                               {"ParameterKey": "Secret", "ParameterValue": "****"}]}  # fmt: skip
    values = {"AllowedCidr": None, "ImageTag": None, "Secret": None, "ClusterName": "fluidity"}
    assert fd.stack_parameters(values, existing) == [
        {"ParameterKey": "AllowedCidr", "ParameterValue": "198.51.100.7/32"},
        {"ParameterKey": "Secret", "UsePreviousValue": True},
        {"ParameterKey": "ClusterName", "ParameterValue": "fluidity"},
    ]
    assert fd.stack_parameters(values, None) == [
        {"ParameterKey": "ClusterName", "ParameterValue": "fluidity"}
    ]


def test_no_command_means_deploy() -> None:
    assert fd.parse_args([]).command == "deploy"
    assert fd.parse_args(["--region", "eu-west-1"]).region == "eu-west-1"
    assert fd.parse_args(["outputs", "--json"]).json is True


# ----------------------------------------------------------------------------- the Lambda zip


def copy_lambda_sources(target: Path) -> None:
    for folder in ("lambdas", "server"):
        (target / folder).mkdir(parents=True)
        for source in (ROOT / folder).glob("*.py"):
            shutil.copy(source, target / folder / source.name)


def test_bundle_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    copy_lambda_sources(first)
    copy_lambda_sources(second)
    for path in second.rglob("*.py"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert build_bundle(first).data == build_bundle(second).data
    (second / "lambdas" / "handlers.py").write_text("# changed\n", encoding="utf-8")
    changed = build_bundle(second)
    assert changed.sha256 != build_bundle(first).sha256
    assert changed.s3_key != build_bundle(first).s3_key


def test_bundle_holds_the_lambda_modules_and_only_the_shared_stdlib_modules_from_server(
    tmp_path: Path,
) -> None:
    bundle = build_bundle(ROOT)
    expected_lambdas = sorted(
        f"lambdas/{p.name}" for p in (ROOT / "lambdas").glob("*.py") if p.name not in DEPLOY_TOOLING
    )
    shared = [
        "server/__init__.py",
        "server/durations.py",
        "server/errors.py",
        "server/framing.py",
        "server/json_logging.py",
    ]
    assert list(bundle.members) == sorted([*expected_lambdas, *shared])
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == list(bundle.members)
        assert {i.date_time for i in infos} == {FIXED_ZIP_TIME}
        assert {(i.external_attr >> 16) & 0o777 for i in infos} == {0o644}
        assert archive.testzip() is None


def test_bundle_imports_its_handlers_with_only_what_the_lambda_runtime_has(tmp_path: Path) -> None:
    """Unzipped alone, the handlers import with the standard library plus the runtime's boto3."""
    bundle_path = tmp_path / "bundle.zip"
    bundle_path.write_bytes(build_bundle(ROOT).data)
    probe = (
        "import sys, sysconfig, json\n"
        "before = set(sys.modules)\n"
        f"sys.path.insert(0, {str(bundle_path)!r})\n"
        "import lambdas.handlers as h\n"
        "site = sysconfig.get_paths()['purelib']\n"
        "third = sorted({n.split('.')[0] for n, m in list(sys.modules.items()) if n not in before\n"
        "    and (getattr(m, '__file__', None) or '').startswith(site)})\n"
        "print(json.dumps({'file': h.__file__, 'third_party': third,\n"
        "    'handlers': [callable(getattr(h, n)) for n in\n"
        "        ('wake_handler', 'status_handler', 'kill_handler', 'sleep_handler', 'api_handler')]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["file"].startswith(str(bundle_path))
    assert all(report["handlers"])
    assert set(report["third_party"]) <= LAMBDA_RUNTIME_PACKAGES


def test_bundle_needs_the_shared_protocol_module(tmp_path: Path) -> None:
    copy_lambda_sources(tmp_path)
    (tmp_path / "server" / "framing.py").unlink()
    with pytest.raises(PackagingError, match=r"framing\.py is missing"):
        build_bundle(tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deploy", "--api-key", "too-short"], "an API key must be 20 to 128 letters and digits"),
        (["deploy", "--api-key", "x" * 19], "an API key must be 20 to 128 letters and digits"),
        (["deploy", "--allowed-cidr", "203.0.113.7"], "needs a prefix length"),
        (["deploy", "--allowed-cidr", "203.0.113.7/24"], "is not an IPv4 network"),
        (["deploy", "--allowed-cidr", "my-laptop"], "is not an IPv4 network"),
        (["deploy", "--idle-threshold", "ten minutes"], "must be a duration like 10m"),
        (["deploy", "--idle-threshold", "0m"], "must be longer than zero"),
        (["deploy", "--log-export-bucket", "Fluidity_Logs"], "is not an S3 bucket name"),
    ],
)
def test_bad_deploy_options_are_refused_before_any_aws_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fd.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
