"""``fluidity-deploy``: put Fluidity's cloud side into an AWS account, show it, take it away.

Commands (``fluidity-deploy <command> --help`` for options):

* ``deploy`` (the default): zip and upload the Lambdas, then create or update the stacks
  ``fluidity-fargate`` and ``fluidity-lambda`` (in that order) and print their outputs.
* ``secrets --cert-dir DIR``: store ca.crt, server.crt and server.key as SSM SecureString
  parameters, which the Fargate task receives as environment variables.
* ``outputs``: print both stacks' outputs and the server's public IP (when a task runs).
* ``destroy``: delete ``fluidity-lambda``, then ``fluidity-fargate``.

AWS credentials and region come from ``--profile``/``AWS_PROFILE`` and
``--region``/``AWS_REGION``/``AWS_DEFAULT_REGION``; ``AWS_ENDPOINT_URL`` is honoured by boto3.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import string
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import boto3
import botocore.exceptions

from lambdas.control import ControlConfig, ControlPlaneFailure, server_status
from lambdas.packaging import LambdaBundle, PackagingError, build_bundle
from server.durations import parse_duration
from server.errors import FluidityError

FARGATE_STACK = "fluidity-fargate"
LAMBDA_STACK = "fluidity-lambda"
#: The order ``deploy`` creates stacks in; ``destroy`` deletes them in reverse.
STACK_ORDER = (FARGATE_STACK, LAMBDA_STACK)
#: Where ``secrets`` stores the TLS material; the Fargate template's CertParameterPrefix default.
DEFAULT_CERT_PREFIX = "/fluidity/tls"
#: Certificate file in --cert-dir -> parameter name under the prefix.
CERT_PARAMETERS = {"ca.crt": "ca-cert", "server.crt": "server-cert", "server.key": "server-key"}
#: Standard-tier SSM parameters (free) hold at most 4 KB.
MAX_PARAMETER_BYTES = 4096
#: Tag on the code bucket ``deploy`` creates, so ``destroy`` only ever removes a bucket it made.
BUCKET_TAG = ("fluidity:purpose", "lambda-code")
API_KEY_ALPHABET = string.ascii_letters + string.digits
API_KEY_LENGTH = 40
DEFAULT_POLL_SECONDS = 5.0
#: What describe-stacks shows instead of a NoEcho parameter's value.
NO_ECHO_MASK = "****"
#: Hang guard for one stack operation; CloudFormation itself gives up long before this.
DEFAULT_WAIT_SECONDS = 3600.0

#: boto3 clients are dynamically typed; this alias names what a parameter is.
Client = Any
Sleep = Callable[[float], None]


class DeployError(FluidityError):
    """Something the user must fix; the message says what and how."""


# ---------------------------------------------------------------------------------------------
# AWS access
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aws:
    """One boto3 session plus the region every client uses."""

    session: boto3.Session
    region: str

    def client(self, service: str) -> Client:
        make_client: Callable[..., Client] = self.session.client  # the stubs only type literal names
        return make_client(service, region_name=self.region)


def resolve_region(explicit: str | None, env: Mapping[str, str], profile_region: str | None) -> str | None:
    """--region, then AWS_REGION, then AWS_DEFAULT_REGION, then the profile's region."""
    for candidate in (explicit, env.get("AWS_REGION"), env.get("AWS_DEFAULT_REGION"), profile_region):
        if candidate:
            return candidate
    return None


def open_aws(profile: str | None, region: str | None, env: Mapping[str, str] | None = None) -> Aws:
    environment = os.environ if env is None else env
    try:
        session = boto3.Session(profile_name=profile or environment.get("AWS_PROFILE") or None)
    except botocore.exceptions.ProfileNotFound as error:
        raise DeployError(f"{error}; list your profiles with `aws configure list-profiles`") from None
    chosen = resolve_region(region, environment, session.region_name)
    if not chosen:
        raise DeployError("no AWS region: pass --region or set AWS_REGION (e.g. AWS_REGION=eu-west-1)")
    return Aws(session=session, region=chosen)


def account_id(sts: Client) -> str:
    """The caller's account; also the first call, so missing credentials fail here, clearly."""
    try:
        return str(sts.get_caller_identity()["Account"])
    except botocore.exceptions.NoCredentialsError:
        raise DeployError(
            "no AWS credentials found: run `aws configure`, set AWS_PROFILE, "
            "or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None


def error_code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def error_message(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", error))


# ---------------------------------------------------------------------------------------------
# Lambda code in S3
# ---------------------------------------------------------------------------------------------


def default_bucket_name(account: str, region: str) -> str:
    return f"fluidity-lambda-code-{account}-{region}"


def ensure_code_bucket(s3: Client, bucket: str, region: str, out: TextIO) -> None:
    """Create the private code bucket unless it exists and is ours already."""
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except botocore.exceptions.ClientError as error:
        if error_code(error) not in ("404", "NoSuchBucket", "NotFound"):
            raise DeployError(
                f"S3 bucket {bucket} exists but this account cannot use it ({error_code(error)}); "
                "choose another name with --bucket"
            ) from None
    emit(out, f"Creating S3 bucket {bucket} for the Lambda code")
    create: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        create["CreateBucketConfiguration"] = {"LocationConstraint": region}
    s3.create_bucket(**create)
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": BUCKET_TAG[0], "Value": BUCKET_TAG[1]}]})


def upload_bundle(s3: Client, bucket: str, bundle: LambdaBundle, out: TextIO) -> str:
    """Upload the zip under its content-addressed key (skipped when that key is there already)."""
    key = bundle.s3_key
    try:
        s3.head_object(Bucket=bucket, Key=key)
        emit(out, f"Lambda code s3://{bucket}/{key} is up to date")
        return key
    except botocore.exceptions.ClientError as error:
        if error_code(error) not in ("404", "NoSuchKey", "NotFound"):
            raise
    emit(out, f"Uploading Lambda code to s3://{bucket}/{key} ({len(bundle.data)} bytes)")
    s3.put_object(Bucket=bucket, Key=key, Body=bundle.data, ContentType="application/zip")
    return key


def delete_code_bucket(s3: Client, bucket: str, out: TextIO) -> None:
    """Empty and delete the code bucket, but only if ``deploy`` created it (it carries our tag)."""
    try:
        tags = s3.get_bucket_tagging(Bucket=bucket).get("TagSet", [])
    except botocore.exceptions.ClientError as error:
        if error_code(error) in ("404", "NoSuchBucket", "NotFound"):
            return
        if error_code(error) == "NoSuchTagSet":
            tags = []
        else:
            raise
    if {"Key": BUCKET_TAG[0], "Value": BUCKET_TAG[1]} not in tags:
        emit(out, f"Keeping S3 bucket {bucket}: fluidity-deploy did not create it")
        return
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket):
        doomed = [
            {"Key": item["Key"], "VersionId": item["VersionId"]}
            for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
        ]
        if doomed:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)
    emit(out, f"Deleted S3 bucket {bucket}")


# ---------------------------------------------------------------------------------------------
# CloudFormation
# ---------------------------------------------------------------------------------------------


def template_body(package: str) -> str:
    """The template shipped beside what it deploys: ``server`` or ``lambdas``."""
    return resources.files(package).joinpath("cloudformation.yaml").read_text(encoding="utf-8")


def describe_stack(cfn: Client, name: str) -> dict[str, Any] | None:
    """The stack, or None when it does not exist (or is fully deleted)."""
    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except botocore.exceptions.ClientError as error:
        if "does not exist" in error_message(error):
            return None
        raise
    if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
        return None
    return dict(stacks[0])


def stack_outputs(stack: Mapping[str, Any]) -> dict[str, str]:
    return {item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs") or []}


def stack_parameter_values(stack: Mapping[str, Any] | None) -> dict[str, str]:
    return {
        item["ParameterKey"]: item.get("ParameterValue", "") for item in (stack or {}).get("Parameters") or []
    }


def format_event(event: Mapping[str, Any]) -> str:
    """``  CREATE_COMPLETE  AWS::ECS::Cluster  Cluster`` (+ the reason when something failed)."""
    line = f"  {event['ResourceStatus']}  {event['ResourceType']}  {event['LogicalResourceId']}"
    reason = event.get("ResourceStatusReason")
    if reason and "FAILED" in event["ResourceStatus"]:
        line += f"  ({reason})"
    return line


def is_no_update_error(error: botocore.exceptions.ClientError) -> bool:
    return error_code(error) == "ValidationError" and "No updates are to be performed" in error_message(error)


def failure_reasons(events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Why resources failed, oldest first, from events newest-first as AWS returns them.

    CloudFormation's own follow-ups ("Resource creation cancelled", the stack-level summary)
    are dropped when a resource-level reason exists, because they only repeat the cause.
    """
    failed = [
        event
        for event in events
        if str(event.get("ResourceStatus", "")).endswith("FAILED") and event.get("ResourceStatusReason")
    ]
    specific = [
        event
        for event in failed
        if event.get("ResourceType") != "AWS::CloudFormation::Stack"
        and "cancelled" not in str(event["ResourceStatusReason"]).lower()
    ]
    chosen = specific or failed
    return [
        f"{event['LogicalResourceId']} ({event['ResourceType']}): {event['ResourceStatusReason']}"
        for event in reversed(chosen)
    ]


def latest_event_id(cfn: Client, stack: str) -> str | None:
    events = cfn.describe_stack_events(StackName=stack).get("StackEvents", [])
    return str(events[0]["EventId"]) if events else None


def events_since(cfn: Client, stack: str, last_seen: str | None) -> list[dict[str, Any]]:
    """Events newer than ``last_seen``, oldest first (AWS pages them newest first)."""
    fresh: list[dict[str, Any]] = []
    for page in cfn.get_paginator("describe_stack_events").paginate(StackName=stack):
        for event in page.get("StackEvents", []):
            if event["EventId"] == last_seen:
                return list(reversed(fresh))
            fresh.append(event)
    return list(reversed(fresh))


@dataclass(frozen=True)
class Waiting:
    """How to wait for CloudFormation: poll interval, hang guard, and the clock to sleep on."""

    poll_seconds: float = DEFAULT_POLL_SECONDS
    limit_seconds: float = DEFAULT_WAIT_SECONDS
    sleep: Sleep = time.sleep


def wait_for_stack(
    cfn: Client,
    stack_id: str,
    last_seen: str | None,
    wanted: str,
    out: TextIO,
    waiting: Waiting,
) -> dict[str, Any]:
    """Print each new stack event until the stack settles; raise with the reasons unless ``wanted``."""
    seen_events: list[dict[str, Any]] = []
    waited = 0.0
    while True:
        fresh = events_since(cfn, stack_id, last_seen)
        for event in fresh:
            emit(out, format_event(event))
        if fresh:
            last_seen = str(fresh[-1]["EventId"])
            seen_events = list(reversed(fresh)) + seen_events
        stack = cfn.describe_stacks(StackName=stack_id)["Stacks"][0]
        status = str(stack["StackStatus"])
        if not status.endswith("IN_PROGRESS"):
            if status == wanted:
                return dict(stack)
            reasons = failure_reasons(seen_events) or [
                str(stack.get("StackStatusReason") or "no reason given")
            ]
            raise DeployError(
                f"stack {stack['StackName']} ended in {status}:\n" + "\n".join(f"  - {r}" for r in reasons)
            )
        if waited >= waiting.limit_seconds:
            raise DeployError(
                f"stack {stack['StackName']} still {status} after {waiting.limit_seconds:g} s; "
                "it keeps going in AWS - check it with `aws cloudformation describe-stack-events`"
            )
        waiting.sleep(waiting.poll_seconds)
        waited += waiting.poll_seconds


def stack_parameters(
    values: Mapping[str, str | None], existing: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """CloudFormation parameters: given values, else the current value on update, else the default.

    The current value is passed explicitly (as describe-stacks shows it) rather than with
    UsePreviousValue, which is equivalent in AWS; only a masked NoEcho value needs UsePreviousValue.
    """
    previous = stack_parameter_values(existing)
    parameters: list[dict[str, Any]] = []
    for key, value in values.items():
        if value is not None:
            parameters.append({"ParameterKey": key, "ParameterValue": value})
        elif previous.get(key) == NO_ECHO_MASK:
            parameters.append({"ParameterKey": key, "UsePreviousValue": True})
        elif key in previous:
            parameters.append({"ParameterKey": key, "ParameterValue": previous[key]})
    return parameters


def clear_failed_create(cfn: Client, stack: Mapping[str, Any], out: TextIO, waiting: Waiting) -> None:
    """A stack left in ROLLBACK_COMPLETE holds nothing and cannot be updated: show why, delete it."""
    name = stack["StackName"]
    events = cfn.describe_stack_events(StackName=stack["StackId"]).get("StackEvents", [])
    emit(out, f"Stack {name} is in ROLLBACK_COMPLETE: its first creation failed.")
    for reason in failure_reasons(events):
        emit(out, f"  - {reason}")
    emit(out, f"It holds no resources; deleting it and creating {name} again.")
    last = latest_event_id(cfn, stack["StackId"])
    cfn.delete_stack(StackName=stack["StackId"])
    wait_for_stack(cfn, stack["StackId"], last, "DELETE_COMPLETE", out, waiting)


def deploy_stack(
    cfn: Client,
    name: str,
    body: str,
    values: Mapping[str, str | None],
    out: TextIO,
    waiting: Waiting,
) -> dict[str, str]:
    """Create or update one stack, showing its events; returns its outputs."""
    existing = describe_stack(cfn, name)
    if existing is not None:
        status = str(existing["StackStatus"])
        if status == "ROLLBACK_COMPLETE":
            clear_failed_create(cfn, existing, out, waiting)
            existing = None
        elif status.endswith("IN_PROGRESS"):
            raise DeployError(
                f"stack {name} is busy ({status}); wait until it finishes, then run deploy again"
            )
        elif status.endswith("FAILED"):
            events = cfn.describe_stack_events(StackName=name).get("StackEvents", [])
            reasons = failure_reasons(events) or [str(existing.get("StackStatusReason") or status)]
            raise DeployError(
                f"stack {name} is in {status} and cannot be updated:\n"
                + "\n".join(f"  - {reason}" for reason in reasons)
                + "\nFix the cause, then run `fluidity-deploy destroy` and deploy again."
            )
    request = {
        "StackName": name,
        "TemplateBody": body,
        "Parameters": stack_parameters(values, existing),
        "Capabilities": ["CAPABILITY_IAM"],
        "Tags": [{"Key": "fluidity:stack", "Value": name}],
    }
    if existing is None:
        emit(out, f"Creating stack {name}")
        stack_id = str(cfn.create_stack(**request, OnFailure="ROLLBACK")["StackId"])
        final = wait_for_stack(cfn, stack_id, None, "CREATE_COMPLETE", out, waiting)
    else:
        emit(out, f"Updating stack {name}")
        stack_id = str(existing["StackId"])
        last = latest_event_id(cfn, stack_id)
        try:
            cfn.update_stack(**request)
        except botocore.exceptions.ClientError as error:
            if not is_no_update_error(error):
                raise
            emit(out, f"  {name} is up to date (no changes)")
            return stack_outputs(existing)
        final = wait_for_stack(cfn, stack_id, last, "UPDATE_COMPLETE", out, waiting)
    return stack_outputs(final)


def delete_stack(cfn: Client, name: str, out: TextIO, waiting: Waiting) -> None:
    existing = describe_stack(cfn, name)
    if existing is None:
        emit(out, f"Stack {name} does not exist; nothing to delete")
        return
    emit(out, f"Deleting stack {name}")
    stack_id = str(existing["StackId"])
    last = latest_event_id(cfn, stack_id)
    cfn.delete_stack(StackName=stack_id)
    wait_for_stack(cfn, stack_id, last, "DELETE_COMPLETE", out, waiting)


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployOptions:
    """What ``deploy`` was asked for; None means "the template default, or keep the current value"."""

    bucket: str | None = None
    cluster_name: str = "fluidity"
    service_name: str = "fluidity-server"
    allowed_cidr: str | None = None
    image_tag: str | None = None
    idle_threshold: str | None = None
    alert_email: str | None = None
    api_key: str | None = None
    log_export_bucket: str | None = None
    source_root: Path | None = None


def generate_api_key() -> str:
    return "".join(secrets.choice(API_KEY_ALPHABET) for _ in range(API_KEY_LENGTH))


def repository_exists(ecr: Client, name: str) -> bool:
    try:
        ecr.describe_repositories(repositoryNames=[name])
        return True
    except botocore.exceptions.ClientError as error:
        if error_code(error) == "RepositoryNotFoundException":
            return False
        raise


def stack_owns_resource(cfn: Client, stack: Mapping[str, Any] | None, logical_id: str) -> bool:
    if stack is None:
        return False
    summaries = cfn.list_stack_resources(StackName=stack["StackId"]).get("StackResourceSummaries", [])
    return any(item.get("LogicalResourceId") == logical_id for item in summaries)


def create_repository_flag(
    cfn: Client, ecr: Client, existing: Mapping[str, Any] | None, service_name: str, out: TextIO
) -> str:
    """Return "false" when a repository kept by an earlier ``destroy`` exists, so its images are reused."""
    if stack_owns_resource(cfn, existing, "Repository"):
        return "true"
    if repository_exists(ecr, service_name):
        emit(out, f"Reusing the existing ECR repository {service_name} (kept from an earlier deployment)")
        return "false"
    return "true"


def log_export_bucket_value(requested: str | None, existing: Mapping[str, Any] | None) -> str:
    """The bucket asked for, else the one the stack has, else none; always passed explicitly.

    An explicit "" (rather than leaving the parameter out) keeps the value stable across
    updates, so an update never sees the optional bucket's condition as changed.
    """
    if requested is not None:
        return requested
    return stack_parameter_values(existing).get("LogExportBucketName", "")


def deploy(aws: Aws, options: DeployOptions, out: TextIO, waiting: Waiting) -> dict[str, dict[str, str]]:
    """Package, upload, create/update fluidity-fargate then fluidity-lambda; returns both outputs."""
    try:
        bundle = build_bundle(options.source_root)
    except PackagingError as error:
        raise DeployError(str(error)) from None
    cfn, s3 = aws.client("cloudformation"), aws.client("s3")
    account = account_id(aws.client("sts"))
    emit(out, f"Deploying Fluidity to account {account}, region {aws.region}")

    existing_fargate = describe_stack(cfn, FARGATE_STACK)
    fargate_values: dict[str, str | None] = {
        "ClusterName": options.cluster_name,
        "ServiceName": options.service_name,
        "AllowedCidr": options.allowed_cidr,
        "ImageTag": options.image_tag,
        "LogExportBucketName": log_export_bucket_value(options.log_export_bucket, existing_fargate),
        "CreateRepository": create_repository_flag(
            cfn, aws.client("ecr"), existing_fargate, options.service_name, out
        ),
    }
    fargate = deploy_stack(cfn, FARGATE_STACK, template_body("server"), fargate_values, out, waiting)

    bucket = options.bucket or default_bucket_name(account, aws.region)
    ensure_code_bucket(s3, bucket, aws.region, out)
    code_key = upload_bundle(s3, bucket, bundle, out)

    existing_lambda = describe_stack(cfn, LAMBDA_STACK)
    api_key = options.api_key
    if api_key is None and "ApiKeyValue" not in stack_parameter_values(existing_lambda):
        api_key = generate_api_key()
    lambda_values: dict[str, str | None] = {
        "CodeBucket": bucket,
        "CodeKey": code_key,
        "ClusterName": fargate.get("ClusterName", options.cluster_name),
        "ServiceName": fargate.get("ServiceName", options.service_name),
        "IdleThreshold": options.idle_threshold,
        "AlertEmail": options.alert_email,
        "ApiKeyValue": api_key,
    }
    control = deploy_stack(cfn, LAMBDA_STACK, template_body("lambdas"), lambda_values, out, waiting)
    outputs = {FARGATE_STACK: fargate, LAMBDA_STACK: control}
    print_outputs(outputs, out)
    image_tag = stack_parameter_values(describe_stack(cfn, FARGATE_STACK)).get("ImageTag") or "latest"
    for warning in readiness_warnings(aws, fargate, image_tag):
        emit(out, f"Note: {warning}")
    return outputs


def readiness_warnings(aws: Aws, fargate: Mapping[str, str], image_tag: str) -> list[str]:
    """What is still missing before the service can start a task (image, TLS parameters)."""
    found: list[str] = []
    names = [f"{DEFAULT_CERT_PREFIX}/{suffix}" for suffix in CERT_PARAMETERS.values()]
    missing = aws.client("ssm").get_parameters(Names=names).get("InvalidParameters", [])
    if missing:
        found.append(
            "the server's TLS material is not stored yet (" + ", ".join(sorted(missing)) + "); "
            "run `fluidity-deploy secrets --cert-dir certs`"
        )
    repository = fargate.get("ServiceName", "fluidity-server")
    try:
        aws.client("ecr").describe_images(repositoryName=repository, imageIds=[{"imageTag": image_tag}])
    except botocore.exceptions.ClientError as error:
        if error_code(error) not in ("ImageNotFoundException", "RepositoryNotFoundException"):
            raise
        uri = fargate.get("RepositoryUri", repository)
        found.append(
            f"no image {uri}:{image_tag} yet; build and push it: `make docker-build-server`, "
            f"`docker tag fluidity-server:latest {uri}:{image_tag}`, `docker push {uri}:{image_tag}` "
            "(after `aws ecr get-login-password | docker login --username AWS --password-stdin "
            f"{uri.split('/')[0]}`)"
        )
    return found


def destroy(aws: Aws, bucket: str | None, keep_bucket: bool, out: TextIO, waiting: Waiting) -> None:
    """Delete fluidity-lambda, then fluidity-fargate (the runbook's order), then our code bucket."""
    cfn = aws.client("cloudformation")
    account = account_id(aws.client("sts"))
    for name in reversed(STACK_ORDER):
        delete_stack(cfn, name, out, waiting)
    if not keep_bucket:
        delete_code_bucket(aws.client("s3"), bucket or default_bucket_name(account, aws.region), out)
    emit(
        out,
        "The ECR repository fluidity-server (with its images) and the TLS parameters under "
        f"{DEFAULT_CERT_PREFIX} are kept. Remove them with:\n"
        "  aws ecr delete-repository --repository-name fluidity-server --force\n"
        f"  aws ssm delete-parameters --names "
        + " ".join(f"{DEFAULT_CERT_PREFIX}/{suffix}" for suffix in CERT_PARAMETERS.values()),
    )


def collect_outputs(cfn: Client) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for name in STACK_ORDER:
        stack = describe_stack(cfn, name)
        if stack is not None:
            found[name] = stack_outputs(stack)
    if not found:
        raise DeployError(
            "neither fluidity-fargate nor fluidity-lambda is deployed; run `fluidity-deploy deploy`"
        )
    return found


def server_state(aws: Aws, fargate: Mapping[str, str]) -> dict[str, Any]:
    """The server's state and public IP (the runbook's list-tasks/describe-tasks/ENI chain), as JSON."""
    config = ControlConfig(
        cluster=fargate.get("ClusterName", "fluidity"), service=fargate.get("ServiceName", "fluidity-server")
    )
    try:
        return server_status(aws.client("ecs"), aws.client("ec2"), config).to_json()
    except ControlPlaneFailure as failure:
        return failure.error.to_json()


def format_server_state(state: Mapping[str, Any]) -> str:
    """``Server public IP: 203.0.113.7 (running, port 8443)``, or why there is none."""
    if "error" in state:
        return f"Server: unknown ({state.get('message')})"
    if state.get("public_ip"):
        return f"Server public IP: {state['public_ip']} ({state['state']}, port {state['port']})"
    return f"Server: {state['state']}, no public IP ({state.get('message')})"


def print_outputs(outputs: Mapping[str, Mapping[str, str]], out: TextIO) -> None:
    for stack, values in outputs.items():
        emit(out, f"{stack} outputs:")
        width = max((len(key) for key in values), default=0)
        for key, value in sorted(values.items()):
            emit(out, f"  {key.ljust(width)}  {value}")


def read_certificates(cert_dir: Path) -> dict[str, str]:
    """The three PEM files, checked before anything is written, so a bad file changes nothing."""
    contents: dict[str, str] = {}
    for filename in CERT_PARAMETERS:
        path = cert_dir / filename
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise DeployError(
                f"{path} not found; create the certificates with `fluidity-certs init --dir {cert_dir}`"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise DeployError(f"cannot read {path}: {error}") from None
        if filename.endswith(".crt") and "-----BEGIN CERTIFICATE-----" not in text:
            raise DeployError(f"{path} is not a PEM certificate (no BEGIN CERTIFICATE line)")
        if filename.endswith(".key"):
            if "PRIVATE KEY-----" not in text:
                raise DeployError(f"{path} is not a PEM private key (no BEGIN ... PRIVATE KEY line)")
            if "ENCRYPTED" in text:
                raise DeployError(f"{path} is encrypted; the server needs the key without a passphrase")
        if len(text.encode("ascii")) > MAX_PARAMETER_BYTES:
            raise DeployError(f"{path} is larger than {MAX_PARAMETER_BYTES} bytes, the SSM parameter limit")
        contents[filename] = text
    return contents


def store_certificates(ssm: Client, cert_dir: Path, prefix: str, out: TextIO) -> list[str]:
    """Write ca.crt, server.crt, server.key as SecureString parameters the Fargate task reads."""
    contents = read_certificates(cert_dir)
    names = []
    for filename, suffix in CERT_PARAMETERS.items():
        name = f"{prefix}/{suffix}"
        ssm.put_parameter(
            Name=name,
            Description=f"Fluidity tunnel server {filename}",
            Value=contents[filename],
            Type="SecureString",
            Tier="Standard",
            Overwrite=True,
        )
        emit(out, f"Stored {cert_dir / filename} as SecureString {name}")
        names.append(name)
    emit(
        out,
        "New tasks get them at start; restart a running server with `aws ecs update-service "
        "--cluster fluidity --service fluidity-server --force-new-deployment`",
    )
    return names


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

COMMANDS = ("deploy", "destroy", "outputs", "secrets")


def api_key_value(text: str) -> str:
    """argparse type: what API Gateway and the template accept as an API key value."""
    if not (20 <= len(text) <= 128 and text.isascii() and text.isalnum()):
        raise argparse.ArgumentTypeError("an API key must be 20 to 128 letters and digits")
    return text


def ipv4_cidr(text: str) -> str:
    """argparse type: an IPv4 network such as 203.0.113.7/32 (the security group's source)."""
    try:
        network = ipaddress.IPv4Network(text, strict=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IPv4 network like 203.0.113.7/32: {error}"
        ) from None
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} needs a prefix length, e.g. {network}/32")
    return text


#: What the template's IdleThreshold parameter takes (one number, an optional unit), written
#: with the spaces and capitals people type: "10 M" is passed on as "10m".
IDLE_THRESHOLD_INPUT = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?", re.IGNORECASE)


def idle_threshold(text: str) -> str:
    """argparse type: a duration the Sleep Lambda understands (10m, 600s, 1h), as the template writes it."""
    match = IDLE_THRESHOLD_INPUT.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"--idle-threshold must be a duration like 10m, 600s or 600, got {text!r}"
        )
    normalised = match.group(1) + (match.group(2) or "").lower()  # "10 m" -> "10m", the template's pattern
    if parse_duration(normalised) <= 0:
        raise argparse.ArgumentTypeError(f"--idle-threshold must be longer than zero, got {text!r}")
    return normalised


#: S3's rules for a bucket name (3-63 lower-case letters, digits, dots, hyphens), as the template checks.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def log_export_bucket(text: str) -> str:
    """argparse type: an S3 bucket name for log exports, or "" to stop managing one."""
    if text and (BUCKET_NAME.fullmatch(text) is None or ".." in text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an S3 bucket name (3-63 lower-case letters, digits, dots and hyphens)"
        )
    return text


def emit(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", help="AWS profile (default: AWS_PROFILE or the default profile)")
    common.add_argument(
        "--region", help="AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's)"
    )
    common.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_SECONDS, help=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="fluidity-deploy",
        usage="fluidity-deploy [COMMAND] [--profile NAME] [--region REGION] [OPTIONS]",
        description="Deploy, inspect or remove Fluidity's AWS stacks (fluidity-fargate, fluidity-lambda).\n"
        "`fluidity-deploy COMMAND --help` lists the options of each command.\n\n"
        "examples:\n"
        "  fluidity-deploy --region us-east-1 --allowed-cidr 203.0.113.7/32     create or update both\n"
        "  fluidity-deploy outputs                  ApiGatewayUrl, ApiKeyId and the server's IP",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="{deploy,secrets,outputs,destroy}")

    run = commands.add_parser("deploy", parents=[common], help="create or update both stacks (default)")
    run.add_argument(
        "--bucket", help="S3 bucket for the Lambda zip (default: fluidity-lambda-code-ACCOUNT-REGION)"
    )
    run.add_argument(
        "--allowed-cidr",
        type=ipv4_cidr,
        help="who may reach port 8443 (default 0.0.0.0/0; e.g. 203.0.113.7/32)",
    )
    run.add_argument("--image-tag", help="image tag the service runs (default: latest)")
    run.add_argument(
        "--idle-threshold", type=idle_threshold, help="stop the server after this long idle (default 10m)"
    )
    run.add_argument("--alert-email", help="subscribe this address to the alarm topic")
    run.add_argument(
        "--api-key",
        type=api_key_value,
        help="use this API key value (20-128 letters/digits) instead of a generated one",
    )
    run.add_argument(
        "--log-export-bucket",
        type=log_export_bucket,
        help='create this S3 bucket for "aws logs create-export-task" backups (e.g. fluidity-logs)',
    )

    store = commands.add_parser("secrets", parents=[common], help="store the server's TLS files in SSM")
    store.add_argument(
        "--cert-dir", type=Path, required=True, help="folder with ca.crt, server.crt, server.key"
    )

    show = commands.add_parser(
        "outputs", parents=[common], help="print both stacks' outputs and the server's public IP"
    )
    show.add_argument("--json", action="store_true", help="print them as JSON")

    remove = commands.add_parser(
        "destroy", parents=[common], help="delete fluidity-lambda, then fluidity-fargate"
    )
    remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    remove.add_argument("--bucket", help="code bucket to remove (default: the one deploy creates)")
    remove.add_argument("--keep-bucket", action="store_true", help="keep the Lambda code bucket")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``fluidity-deploy`` with no command, or only options, means ``fluidity-deploy deploy``."""
    arguments = list(argv)
    if not arguments or (arguments[0] not in COMMANDS and arguments[0] not in ("-h", "--help")):
        arguments.insert(0, "deploy")
    return build_parser().parse_args(arguments)


def confirm(question: str, stdin: TextIO) -> bool:
    if not stdin.isatty():
        return False
    sys.stdout.write(f"{question} [y/N] ")
    sys.stdout.flush()
    return stdin.readline().strip().lower() in ("y", "yes")


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    aws = open_aws(args.profile, args.region)
    waiting = Waiting(poll_seconds=max(args.poll_interval, 0.0))
    if args.command == "deploy":
        options = DeployOptions(
            bucket=args.bucket,
            allowed_cidr=args.allowed_cidr,
            image_tag=args.image_tag,
            idle_threshold=args.idle_threshold,
            alert_email=args.alert_email,
            api_key=args.api_key,
            log_export_bucket=args.log_export_bucket,
        )
        deploy(aws, options, out, waiting)
    elif args.command == "secrets":
        store_certificates(aws.client("ssm"), args.cert_dir, DEFAULT_CERT_PREFIX, out)
    elif args.command == "outputs":
        outputs = collect_outputs(aws.client("cloudformation"))
        state = server_state(aws, outputs[FARGATE_STACK]) if FARGATE_STACK in outputs else None
        if args.json:
            shown: dict[str, Any] = dict(outputs)
            if state is not None:
                shown["server"] = state
            emit(out, json.dumps(shown, indent=2, sort_keys=True))
        else:
            print_outputs(outputs, out)
            if state is not None:
                emit(out, format_server_state(state))
    elif args.command == "destroy":
        if not args.yes and not confirm(
            f"Delete stacks {LAMBDA_STACK} and {FARGATE_STACK} in {aws.region}?", sys.stdin
        ):
            raise DeployError("not confirmed; pass --yes to delete without asking")
        destroy(aws, args.bucket, args.keep_bucket, out, waiting)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_command(args, sys.stdout)
    except DeployError as error:
        print(f"fluidity-deploy: error: {error}", file=sys.stderr)
        return 1
    except botocore.exceptions.NoCredentialsError:
        print(
            "fluidity-deploy: error: no AWS credentials found (run `aws configure` or set AWS_PROFILE)",
            file=sys.stderr,
        )
        return 1
    except botocore.exceptions.ClientError as error:
        operation = getattr(error, "operation_name", "request")
        print(
            f"fluidity-deploy: error: AWS refused {operation}: {error_code(error)}: {error_message(error)}",
            file=sys.stderr,
        )
        return 1
    except botocore.exceptions.BotoCoreError as error:
        print(f"fluidity-deploy: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "fluidity-deploy: interrupted; a stack operation already started keeps running in AWS",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
