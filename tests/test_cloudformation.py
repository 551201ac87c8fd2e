"""The two CloudFormation templates: cfn-lint clean, and the properties moto cannot show.

moto's CloudFormation silently skips ApiKey, UsagePlan, UsagePlanKey, Stage and Alarm resources
and drops the ECS service's network configuration, so those are checked here, on the template
itself, next to cfn-lint (which validates every property against AWS's resource schemas).
What moto does model is checked by deploying into it (tests/test_deploy.py).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import lambdas.handlers
from lambdas.deploy import CERT_PARAMETERS, DEFAULT_CERT_PREFIX, idle_threshold
from server.config import ECS_STOP_TIMEOUT_SECONDS, load_server_config
from server.durations import parse_duration
from server.framing import (
    METRIC_ACTIVE_CONNECTIONS,
    METRIC_LAST_ACTIVITY,
    METRIC_SERVICE_DIMENSION,
    METRICS_NAMESPACE,
    TUNNEL_PORT,
)

ROOT = Path(__file__).resolve().parent.parent
FARGATE_TEMPLATE = ROOT / "server" / "cloudformation.yaml"
LAMBDA_TEMPLATE = ROOT / "lambdas" / "cloudformation.yaml"
CFN_LINT = Path(sys.executable).with_name("cfn-lint")
RUNBOOK_ALARMS = ("WakeLambdaErrorAlarm", "SleepLambdaErrorAlarm", "KillLambdaErrorAlarm")
RUNBOOK_OUTPUTS = {"ApiGatewayUrl", "ApiKeyId", "DashboardURL", "AlarmNotificationTopicArn"}
SERVER_SECRETS = {
    "FLUIDITY_CA_CERT_PEM": "ca-cert",
    "FLUIDITY_SERVER_CERT_PEM": "server-cert",
    "FLUIDITY_SERVER_KEY_PEM": "server-key",
}


class _CfnLoader(yaml.SafeLoader):
    """YAML loader that turns short-form intrinsics (!Ref, !Sub, ...) into their long form."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(path.read_text(encoding="utf-8"), Loader=_CfnLoader)  # noqa: S506
    return loaded


@pytest.fixture(scope="module")
def fargate() -> dict[str, Any]:
    return load_template(FARGATE_TEMPLATE)


@pytest.fixture(scope="module")
def control() -> dict[str, Any]:
    return load_template(LAMBDA_TEMPLATE)


def resources_of(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in template["Resources"].items() if res["Type"] == kind}


def props(template: dict[str, Any], logical_id: str) -> dict[str, Any]:
    properties: dict[str, Any] = template["Resources"][logical_id]["Properties"]
    return properties


def sub_text(value: Any) -> str:
    """The format string of a !Sub (either form), or the plain string."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        inner = value["Fn::Sub"]
        return str(inner[0] if isinstance(inner, list) else inner)
    return str(value)


# ----------------------------------------------------------------------------- cfn-lint


def run_cfn_lint(*templates: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CFN_LINT), "--format", "parseable", *map(str, templates)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def cfn_lint_result() -> subprocess.CompletedProcess[str]:
    """One cfn-lint run over both templates (it is slow to start); rc 0 = no errors, no warnings."""
    return run_cfn_lint(FARGATE_TEMPLATE, LAMBDA_TEMPLATE)


@pytest.mark.parametrize("template", [FARGATE_TEMPLATE, LAMBDA_TEMPLATE], ids=["fargate", "lambda"])
def test_template_passes_cfn_lint_without_errors_or_warnings(
    cfn_lint_result: subprocess.CompletedProcess[str], template: Path
) -> None:
    assert [line for line in cfn_lint_result.stdout.splitlines() if line.startswith(f"{template}:")] == []
    assert (cfn_lint_result.returncode, cfn_lint_result.stderr) == (0, "")


def test_cfn_lint_check_rejects_a_deprecated_runtime(tmp_path: Path) -> None:
    """The lint check above can fail: a copy with a deprecated runtime is reported (E2531)."""
    broken = tmp_path / "cloudformation.yaml"
    text = LAMBDA_TEMPLATE.read_text(encoding="utf-8")
    broken.write_text(text.replace("Runtime: python3.12", "Runtime: python3.7", 1), encoding="utf-8")
    result = run_cfn_lint(broken)
    assert result.returncode != 0
    assert any(":E2531:" in line for line in result.stdout.splitlines())


# ----------------------------------------------------------------------------- fluidity-fargate


def test_task_definition_is_the_small_fargate_size_with_the_tunnel_port(fargate: dict[str, Any]) -> None:
    task = props(fargate, "TaskDefinition")
    assert (task["Cpu"], task["Memory"]) == ("256", "512")
    assert task["Family"] == {"Ref": "ServiceName"}
    assert fargate["Parameters"]["ServiceName"]["Default"] == "fluidity-server"
    assert task["RequiresCompatibilities"] == ["FARGATE"]
    assert task["NetworkMode"] == "awsvpc"
    (container,) = task["ContainerDefinitions"]
    assert container["PortMappings"] == [{"ContainerPort": TUNNEL_PORT, "Protocol": "tcp"}]
    # No container-level memory: raising the task's memory (as the runbook does) must be enough.
    assert "Memory" not in container


def test_stop_timeout_leaves_room_for_the_servers_shutdown_grace(fargate: dict[str, Any]) -> None:
    (container,) = props(fargate, "TaskDefinition")["ContainerDefinitions"]
    grace = load_server_config(None, env={}).shutdown_grace
    assert container["StopTimeout"] > grace
    # The server warns about a grace period at or above this; both must describe the same task.
    assert container["StopTimeout"] == ECS_STOP_TIMEOUT_SECONDS


def test_tls_material_reaches_the_container_as_secrets_from_ssm(fargate: dict[str, Any]) -> None:
    (container,) = props(fargate, "TaskDefinition")["ContainerDefinitions"]
    secrets = {item["Name"]: sub_text(item["ValueFrom"]) for item in container["Secrets"]}
    assert set(secrets) == set(SERVER_SECRETS)
    for name, suffix in SERVER_SECRETS.items():
        assert secrets[name].endswith(f":parameter${{CertParameterPrefix}}/{suffix}")
    assert set(SERVER_SECRETS.values()) == set(CERT_PARAMETERS.values())
    assert fargate["Parameters"]["CertParameterPrefix"]["Default"] == DEFAULT_CERT_PREFIX
    assert not any("PEM" in item["Name"] for item in container["Environment"])
    execution = props(fargate, "ExecutionRole")["Policies"][0]["PolicyDocument"]["Statement"]
    reads = [s for s in execution if s["Action"] == "ssm:GetParameters"]
    assert [sub_text(s["Resource"]) for s in reads] == [
        "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${CertParameterPrefix}/*"
    ]


def test_service_is_public_fargate_at_zero_with_nothing_that_costs_money_while_idle(
    fargate: dict[str, Any],
) -> None:
    service = props(fargate, "Service")
    assert service["DesiredCount"] == 0
    assert service["LaunchType"] == "FARGATE"
    network = service["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["AssignPublicIp"] == "ENABLED"
    assert network["Subnets"] == [{"Ref": "PublicSubnet"}]
    assert network["SecurityGroups"] == [{"Ref": "ServerSecurityGroup"}]
    kinds = {res["Type"] for res in fargate["Resources"].values()}
    assert not {k for k in kinds if k.startswith("AWS::ElasticLoadBalancing")}
    assert "AWS::EC2::NatGateway" not in kinds
    assert "AWS::EC2::EIP" not in kinds
    assert props(fargate, "Cluster")["ClusterSettings"] == [
        {"Name": "containerInsights", "Value": "disabled"}
    ]
    route = props(fargate, "DefaultRoute")
    assert (route["DestinationCidrBlock"], route["GatewayId"]) == ("0.0.0.0/0", {"Ref": "InternetGateway"})


def test_security_group_opens_only_the_tunnel_port_to_the_cidr_parameter(fargate: dict[str, Any]) -> None:
    ingress = props(fargate, "ServerSecurityGroup")["SecurityGroupIngress"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"], r["CidrIp"]) for r in ingress] == [
        ("tcp", TUNNEL_PORT, TUNNEL_PORT, {"Ref": "AllowedCidr"})
    ]


def test_task_role_may_only_put_metrics_into_the_fluidity_namespace(fargate: dict[str, Any]) -> None:
    (policy,) = props(fargate, "TaskRole")["Policies"]
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Action"] == "cloudwatch:PutMetricData"
    assert statement["Condition"] == {"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}}


def test_execution_role_pulls_only_the_server_repository_and_writes_only_its_log_group(
    fargate: dict[str, Any],
) -> None:
    statements = props(fargate, "ExecutionRole")["Policies"][0]["PolicyDocument"]["Statement"]
    by_sid = {s["Sid"]: s for s in statements}
    assert by_sid["EcrLogin"]["Action"] == "ecr:GetAuthorizationToken"  # has no resource-level form
    assert sub_text(by_sid["PullServerImage"]["Resource"]).endswith(":repository/${ServiceName}")
    assert by_sid["WriteServerLogs"]["Resource"] == {"Fn::GetAtt": ["ServerLogGroup", "Arn"]}
    assert props(fargate, "ServerLogGroup")["LogGroupName"] == "/fluidity/server"
    wildcard = [s["Sid"] for s in statements if s["Resource"] == "*"]
    assert wildcard == ["EcrLogin"]


def test_repository_survives_stack_deletion(fargate: dict[str, Any]) -> None:
    """The runbook deletes the stacks, then (optionally) the repository: it must outlive the stack."""
    repository = fargate["Resources"]["Repository"]
    assert repository["DeletionPolicy"] == repository["UpdateReplacePolicy"] == "Retain"
    assert repository["Properties"]["RepositoryName"] == {"Ref": "ServiceName"}


def test_container_health_check_matches_the_dockerfile(fargate: dict[str, Any]) -> None:
    (container,) = props(fargate, "TaskDefinition")["ContainerDefinitions"]
    command = container["HealthCheck"]["Command"]
    dockerfile = (ROOT / "server" / "Dockerfile").read_text(encoding="utf-8")
    healthcheck = re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])", dockerfile)
    assert healthcheck is not None
    assert command == ["CMD", *json.loads(healthcheck.group(1))]


def test_log_export_bucket_is_optional_private_kept_and_writable_by_cloudwatch_logs(
    fargate: dict[str, Any],
) -> None:
    """The runbook's log backup (create-export-task --destination fluidity-logs) needs this bucket."""
    parameter = fargate["Parameters"]["LogExportBucketName"]
    assert parameter["Default"] == ""
    assert re.fullmatch(parameter["AllowedPattern"], "fluidity-logs")
    assert not re.fullmatch(parameter["AllowedPattern"], "Fluidity_Logs")
    bucket = fargate["Resources"]["LogExportBucket"]
    assert bucket["Condition"] == fargate["Resources"]["LogExportBucketPolicy"]["Condition"]
    assert fargate["Conditions"][bucket["Condition"]] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "LogExportBucketName"}, ""]}]
    }
    assert bucket["DeletionPolicy"] == bucket["UpdateReplacePolicy"] == "Retain"  # backups outlive the stack
    assert all(bucket["Properties"]["PublicAccessBlockConfiguration"].values())
    statements = props(fargate, "LogExportBucketPolicy")["PolicyDocument"]["Statement"]
    assert {sub_text(s["Principal"]["Service"]) for s in statements} == {
        "logs.${AWS::Region}.${AWS::URLSuffix}"
    }
    assert {s["Action"]: sub_text(s["Resource"]) for s in statements} == {
        "s3:GetBucketAcl": "{'Fn::GetAtt': ['LogExportBucket', 'Arn']}",
        "s3:PutObject": "${LogExportBucket.Arn}/*",
    }
    assert all(
        s["Condition"]["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"} for s in statements
    )


def test_fargate_outputs_name_what_the_lambdas_and_the_user_need(fargate: dict[str, Any]) -> None:
    assert {"ClusterName", "ServiceName", "RepositoryUri", "SecurityGroupId", "SubnetId"} <= set(
        fargate["Outputs"]
    )


# ----------------------------------------------------------------------------- fluidity-lambda

FUNCTIONS = {
    "WakeFunction": ("fluidity-wake", "wake_handler"),
    "StatusFunction": ("fluidity-status", "status_handler"),
    "KillFunction": ("fluidity-kill", "kill_handler"),
    "SleepFunction": ("fluidity-sleep", "sleep_handler"),
}


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_functions_run_existing_handlers_on_a_current_runtime(
    control: dict[str, Any], logical_id: str
) -> None:
    name, handler = FUNCTIONS[logical_id]
    function = props(control, logical_id)
    assert function["FunctionName"] == name
    assert function["Runtime"] in ("python3.12", "python3.13")
    assert function["Handler"] == f"lambdas.handlers.{handler}"
    assert callable(getattr(lambdas.handlers, handler))
    assert function["Code"] == {"S3Bucket": {"Ref": "CodeBucket"}, "S3Key": {"Ref": "CodeKey"}}
    env = function["Environment"]["Variables"]
    assert env == {
        "CLUSTER_NAME": {"Ref": "ClusterName"},
        "SERVICE_NAME": {"Ref": "ServiceName"},
        "IDLE_THRESHOLD": {"Ref": "IdleThreshold"},
        "TUNNEL_PORT": str(TUNNEL_PORT),
        "METRICS_NAMESPACE": METRICS_NAMESPACE,
    }
    log_group_id = logical_id.replace("Function", "LogGroup")
    assert log_group_id in control["Resources"][logical_id]["DependsOn"]
    assert props(control, log_group_id)["LogGroupName"] == f"/aws/lambda/{name}"
    assert props(control, log_group_id)["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_lambda_permissions_are_scoped_to_the_one_service(control: dict[str, Any]) -> None:
    statements = props(control, "ServiceControlPolicy")["PolicyDocument"]["Statement"]
    by_sid = {s["Sid"]: s for s in statements}
    scale = by_sid["ScaleAndDescribeService"]
    assert set(scale["Action"]) == {"ecs:UpdateService", "ecs:DescribeServices"}
    assert sub_text(scale["Resource"]).endswith(":service/${ClusterName}/${ServiceName}")
    assert sub_text(by_sid["DescribeClusterTasks"]["Resource"]).endswith(":task/${ClusterName}/*")
    assert by_sid["ListClusterTasks"]["Condition"]["ArnEquals"]["ecs:cluster"]
    actions = {
        a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert not {a for a in actions if a.endswith("*")}
    assert {
        "ec2:DescribeNetworkInterfaces",
        "cloudwatch:GetMetricStatistics",
        "cloudwatch:GetMetricData",
    } <= actions
    assert "logs:CreateLogGroup" not in actions  # the stack creates the groups, with retention
    assert props(control, "ServiceControlPolicy")["Roles"] == [{"Ref": "LambdaRole"}]


ROUTES = {"WakeMethod": ("POST", "wake", "WakeFunction"), "StatusMethod": ("GET", "status", "StatusFunction"),
          "KillMethod": ("POST", "kill", "KillFunction")}  # fmt: skip


@pytest.mark.parametrize("method_id", sorted(ROUTES))
def test_api_routes_require_the_api_key_and_reach_their_function(
    control: dict[str, Any], method_id: str
) -> None:
    verb, path, function = ROUTES[method_id]
    method = props(control, method_id)
    assert method["HttpMethod"] == verb
    assert method["ApiKeyRequired"] is True
    resource = props(control, method["ResourceId"]["Ref"])
    assert resource["PathPart"] == path
    integration = method["Integration"]
    assert (integration["Type"], integration["IntegrationHttpMethod"]) == ("AWS_PROXY", "POST")
    assert f"${{{function}.Arn}}" in sub_text(integration["Uri"])
    permission = props(control, f"{function.removesuffix('Function')}ApiPermission")
    assert permission["FunctionName"] == {"Ref": function}
    assert sub_text(permission["SourceArn"]).endswith(f"${{RestApi}}/*/{verb}/{path}")


def test_api_key_usage_plan_and_throttling(control: dict[str, Any]) -> None:
    assert props(control, "ApiKey")["Value"] == {"Ref": "ApiKeyValue"}
    assert props(control, "ApiKey")["Enabled"] is True
    plan = props(control, "UsagePlan")
    assert plan["ApiStages"] == [{"ApiId": {"Ref": "RestApi"}, "Stage": {"Ref": "ApiStage"}}]
    assert plan["Throttle"]["RateLimit"] > 0 and plan["Throttle"]["BurstLimit"] > 0
    assert plan["Quota"]["Period"] == "DAY"
    key = props(control, "UsagePlanKey")
    assert (key["KeyId"], key["UsagePlanId"], key["KeyType"]) == (
        {"Ref": "ApiKey"},
        {"Ref": "UsagePlan"},
        "API_KEY",
    )
    stage = props(control, "ApiStage")
    assert stage["StageName"] == "prod"
    assert stage["MethodSettings"][0]["ThrottlingRateLimit"] > 0


def test_outputs_are_exactly_the_runbooks_and_api_key_id_carries_the_key_value(
    control: dict[str, Any],
) -> None:
    outputs = control["Outputs"]
    assert set(outputs) == RUNBOOK_OUTPUTS
    # The runbook sends the ApiKeyId output as the x-api-key header, so it must be the key's value.
    assert outputs["ApiKeyId"]["Value"] == {"Ref": "ApiKeyValue"}
    assert props(control, "ApiKey")["Value"] == outputs["ApiKeyId"]["Value"]
    parameter = control["Parameters"]["ApiKeyValue"]
    assert parameter["MinLength"] >= 20 and "NoEcho" not in parameter
    url = sub_text(outputs["ApiGatewayUrl"]["Value"])
    assert url == "https://${RestApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/prod"
    assert props(control, "ApiStage")["StageName"] == url.rsplit("/", 1)[1]
    assert outputs["AlarmNotificationTopicArn"]["Value"] == {"Ref": "AlarmTopic"}
    assert "#dashboards:name=${Dashboard}" in sub_text(outputs["DashboardURL"]["Value"])


@pytest.mark.parametrize("logical_id", RUNBOOK_ALARMS)
def test_runbook_alarms_exist_and_match_the_fluidity_prefix(control: dict[str, Any], logical_id: str) -> None:
    alarm = props(control, logical_id)
    assert control["Resources"][logical_id]["Type"] == "AWS::CloudWatch::Alarm"
    # `aws cloudwatch describe-alarms --alarm-name-prefix fluidity` lists it, under the runbook's name.
    assert alarm["AlarmName"] == f"fluidity-{logical_id}"
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
    function = logical_id.replace("LambdaErrorAlarm", "Function")
    lambda_errors = {
        "Namespace": "AWS/Lambda",
        "MetricName": "Errors",
        "Dimensions": [{"Name": "FunctionName", "Value": {"Ref": function}}],
    }
    if "Metrics" not in alarm:  # Sleep raises on failure, so Lambda's own error count is enough
        assert {k: alarm[k] for k in lambda_errors} == lambda_errors
        return
    # Wake and Kill answer failures with JSON errors instead of crashing: count those too.
    by_id = {m["Id"]: m for m in alarm["Metrics"]}
    assert by_id["crashes"]["MetricStat"]["Metric"] == lambda_errors
    failed_metric = by_id["failed"]["MetricStat"]["Metric"]
    assert by_id["failures"]["Expression"] == "FILL(crashes, 0) + FILL(failed, 0)"
    assert [m["Id"] for m in alarm["Metrics"] if m["ReturnData"]] == ["failures"]
    route = logical_id.removesuffix("LambdaErrorAlarm")
    log_filter = props(control, f"{route}FailedRequestsFilter")
    assert log_filter["LogGroupName"] == {"Ref": f"{route}LogGroup"}
    (transformation,) = log_filter["MetricTransformations"]
    assert failed_metric == {
        "Namespace": transformation["MetricNamespace"],
        "MetricName": transformation["MetricName"],
    }
    # Fields of the handlers' JSON log line for a reply ("status_code", "error").
    pattern = log_filter["FilterPattern"]
    assert "$.status_code >= 500" in pattern
    assert '$.error = "cluster_not_found"' in pattern and '$.error = "service_not_found"' in pattern


@pytest.mark.parametrize("text", ["10m", "600s", "600", "1h", "500ms", "1.5m"])
def test_idle_threshold_parameter_accepts_what_the_sleep_lambda_parses(
    control: dict[str, Any], text: str
) -> None:
    assert re.fullmatch(control["Parameters"]["IdleThreshold"]["AllowedPattern"], text)
    assert parse_duration(text) > 0


@pytest.mark.parametrize("text", ["ten minutes", "-1m", "10 minutes", ""])
def test_idle_threshold_parameter_refuses_what_the_sleep_lambda_cannot_parse(
    control: dict[str, Any], text: str
) -> None:
    assert not re.fullmatch(control["Parameters"]["IdleThreshold"]["AllowedPattern"], text)


@pytest.mark.parametrize(
    ("text", "passed_on"),
    [("10m", "10m"), (" 10 M ", "10m"), ("1.5H", "1.5h"), ("600", "600"), ("500 ms", "500ms")],
)
def test_deploy_passes_on_idle_thresholds_in_the_template_pattern(
    control: dict[str, Any], text: str, passed_on: str
) -> None:
    """The shared parser reads more ("1m30s"); deploy hands CloudFormation only what it accepts."""
    assert idle_threshold(text) == passed_on
    assert re.fullmatch(control["Parameters"]["IdleThreshold"]["AllowedPattern"], passed_on)
    assert parse_duration(passed_on) > 0


@pytest.mark.parametrize("text", ["1m30s", "ten minutes", "-1m", "1 0m", ""])
def test_deploy_refuses_idle_thresholds_the_template_would_refuse(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be a duration like 10m"):
        idle_threshold(text)


def test_sleep_runs_every_five_minutes(control: dict[str, Any]) -> None:
    rule = props(control, "SleepSchedule")
    assert (rule["Name"], rule["ScheduleExpression"], rule["State"]) == (
        "fluidity-sleep-schedule",
        "rate(5 minutes)",
        "ENABLED",
    )
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["SleepFunction", "Arn"]}
    permission = props(control, "SleepSchedulePermission")
    assert (permission["Principal"], permission["SourceArn"]) == (
        "events.amazonaws.com",
        {"Fn::GetAtt": ["SleepSchedule", "Arn"]},
    )


def test_alert_email_subscription_is_optional(control: dict[str, Any]) -> None:
    assert control["Parameters"]["AlertEmail"]["Default"] == ""
    assert control["Resources"]["AlarmEmailSubscription"]["Condition"] == "HasAlertEmail"


def test_dashboard_shows_the_runbooks_metrics(control: dict[str, Any]) -> None:
    body = sub_text(props(control, "Dashboard")["DashboardBody"])
    rendered = re.sub(r"\$\{([^}]+)\}", lambda m: f"<{m.group(1)}>", body)
    widgets = json.loads(rendered)["widgets"]
    metrics = [tuple(line) for widget in widgets for line in widget["properties"]["metrics"]]
    for function in FUNCTIONS:
        assert ("AWS/Lambda", "Invocations", "FunctionName", f"<{function}>") in metrics
        assert ("AWS/Lambda", "Errors", "FunctionName", f"<{function}>") in metrics
    for name in ("CPUUtilization", "MemoryUtilization"):
        assert ("AWS/ECS", name, "ClusterName", "<ClusterName>", "ServiceName", "<ServiceName>") in metrics
    for name in (METRIC_ACTIVE_CONNECTIONS, METRIC_LAST_ACTIVITY):
        assert (METRICS_NAMESPACE, name, METRIC_SERVICE_DIMENSION, "<ServiceName>") in metrics
    assert ("AWS/ApiGateway", "Count", "ApiName", "fluidity-api", "Stage", "prod") in metrics
    assert props(control, "RestApi")["Name"] == "fluidity-api"
