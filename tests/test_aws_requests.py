"""The aws backend's requests: built from the cloud-neutral specs, checked against botocore's service
models, and accepted by moto's server over HTTP where moto implements the call. UpdateEndpoint is
not implemented by moto (HTTP 500): it is checked with botocore's Stubber, which validates the
parameters against the same service model before answering."""

from __future__ import annotations

import json
import urllib.request

import pytest

from mlfactory.backends.aws import AwsSettings
from mlfactory.backends.aws import sagemaker as aws
from mlfactory.specs import Accelerator, BatchJobSpec, BudgetExceeded, EndpointSpec, ModelRef, TrainingJobSpec

ROLE = "arn:aws:iam::123456789012:role/mlfactory-training"
SERVING_ROLE = "arn:aws:iam::123456789012:role/mlfactory-serving"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mlfactory:1.0"


@pytest.fixture
def settings() -> AwsSettings:
    return AwsSettings(role_arn=ROLE, serving_role_arn=SERVING_ROLE, image_uri=IMAGE, budget_usd=50, tags={"team": "ml"},
                   subnets=["subnet-0abc"], security_group_ids=["sg-0abc"], kms_key_id="alias/mlfactory")


def spec(**changes) -> TrainingJobSpec:
    fields = dict(name="asset-triggered-2026-11-22t03-t0", input_uri="s3://data/models/training_sets/abc",
                  output_uri="s3://data/models/runs/r1/trial-0", checkpoint_uri="s3://data/models/checkpoints/r1/trial-0",
                  hyperparameters={"epochs": 3, "learning_rate": 0.001, "hidden_sizes": [128, 64]},
                  environment={"MLFLOW_TRACKING_URI": "https://mlflow.example.com"},
                  tags={"mlfactory.airflow_run_id": "asset_triggered__2026-11-22T03:01:33+00:00", "mlfactory.trial": "0"})
    return TrainingJobSpec(**{**fields, **changes})


MODEL = ModelRef(name="customer_churn", version="3", uri="s3://data/mlflow/1/abc/artifacts")


def endpoint(**changes) -> EndpointSpec:
    return EndpointSpec(**{"name": "customer_churn", "model": MODEL, **changes})


@pytest.fixture
def sagemaker(moto_server):
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).close()
    return boto3.client("sagemaker", endpoint_url=moto_server, region_name="us-east-1")


@pytest.mark.parametrize("accelerator, instance", [
    (Accelerator(), "ml.m5.xlarge"),
    (Accelerator(kind="gpu", model="nvidia-a10g", count=1), "ml.g5.xlarge"),
    (Accelerator(kind="gpu", count=4), "ml.g5.12xlarge"),  # the default GPU
    (Accelerator(kind="gpu", model="nvidia-h100", count=8), "ml.p5.48xlarge"),
    (Accelerator(kind="gpu", model="nvidia-h100-80gb", count=8), "ml.p5.48xlarge"),
    (Accelerator(kind="gpu", model="nvidia-l4", count=1), "ml.g6.xlarge"),
])
def test_the_catalog_maps_accelerators_to_instance_types(settings, accelerator, instance):
    assert aws.training_instance(accelerator, settings) == instance


def test_endpoints_and_transforms_size_from_the_neutral_accelerator_with_aws_overrides(settings):
    gpu = Accelerator(kind="gpu", model="nvidia-l4", count=1)
    assert (aws.endpoint_instance(Accelerator(), settings), aws.transform_instance(Accelerator(), settings)) == \
        ("ml.m5.large", "ml.m5.xlarge")
    assert aws.endpoint_instance(gpu, settings) == aws.transform_instance(gpu, settings) == "ml.g6.xlarge"
    pinned = settings.model_copy(update={"endpoint_instance_type": "ml.c5.large", "transform_instance_type": "ml.c5.4xlarge"})
    assert (aws.endpoint_instance(gpu, pinned), aws.transform_instance(gpu, pinned)) == ("ml.c5.large", "ml.c5.4xlarge")
    with pytest.raises(aws.AwsRequestError, match="or set aws.endpoint_instance_type"):
        aws.endpoint_instance(Accelerator(kind="gpu", model="nvidia-h100", count=1), settings)


def test_the_catalog_refuses_what_it_cannot_place(settings):
    with pytest.raises(aws.AwsRequestError, match=r"nvidia-h100 comes \[8\] per instance"):
        aws.training_instance(Accelerator(kind="gpu", model="nvidia-h100", count=2), settings)
    with pytest.raises(aws.AwsRequestError, match="TPUs exist on the gcp backend"):
        aws.training_instance(Accelerator(kind="tpu", model="tpu-v5e", count=4), settings)
    override = settings.model_copy(update={"training_instance_type": "ml.c5.2xlarge"})
    assert aws.training_instance(Accelerator(kind="gpu", model="nvidia-h100", count=2), override) == "ml.c5.2xlarge"


def test_the_cost_guard_refuses_a_job_over_budget(settings):
    small = spec(accelerator=Accelerator(kind="gpu", model="nvidia-a10g", count=1), nodes=2, max_runtime_s=7200)
    assert aws.check_training_budget(small, settings).usd == pytest.approx(2 * 2 * 1.408)
    big = spec(accelerator=Accelerator(kind="gpu", model="nvidia-h100", count=8), nodes=2, max_runtime_s=3600)
    with pytest.raises(BudgetExceeded, match=r"up to \$226\.14 .*above aws.budget_usd \$50\.00"):
        aws.check_training_budget(big, settings)
    unpriced = settings.model_copy(update={"training_instance_type": "ml.trn1.32xlarge"})
    with pytest.raises(aws.AwsRequestError, match="no price for ml.trn1.32xlarge"):
        aws.check_training_budget(small, unpriced)
    priced = unpriced.model_copy(update={"prices_usd_per_hour": {"ml.trn1.32xlarge": 10.0}})
    assert aws.check_training_budget(small, priced).usd == pytest.approx(2 * 2 * 10.0)


def test_the_training_request_and_moto_runs_it(settings, sagemaker):
    job = spec(nodes=2, accelerator=Accelerator(kind="gpu", model="nvidia-a10g", count=1), max_runtime_s=5400)
    request = aws.create_training_job_request(job, settings)
    assert request["AlgorithmSpecification"]["ContainerEntrypoint"] == ["python", "-m", "mlfactory.training.train"]
    args = request["AlgorithmSpecification"]["ContainerArguments"]
    assert "--train-uri" not in args and "--output-uri" not in args  # SM_CHANNEL_TRAIN and SM_MODEL_DIR give them
    # one JSON argument: the values off their defaults (hidden_sizes [128, 64] is one), within SageMaker's 256 characters
    assert json.loads(args[args.index("--hyperparameters") + 1]) == {"epochs": 3, "learning_rate": 0.001}
    assert max(map(len, args)) <= 256
    assert request["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 50,
                                         "VolumeKmsKeyId": "alias/mlfactory"}
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 5400, "MaxWaitTimeInSeconds": 10800}
    assert request["CheckpointConfig"] == {"S3Uri": job.checkpoint_uri, "LocalPath": "/opt/ml/checkpoints"}
    assert request["InputDataConfig"][0]["ChannelName"] == "train"
    assert request["VpcConfig"] == {"SecurityGroupIds": ["sg-0abc"], "Subnets": ["subnet-0abc"]}
    assert {"Key": "mlfactory.airflow_run_id", "Value": "asset_triggered__2026-11-22T03:01:33+00:00"} in request["Tags"]
    assert request["RoleArn"] == ROLE  # the training role: the serving role never trains

    sagemaker.create_training_job(**request)
    described = sagemaker.describe_training_job(TrainingJobName=request["TrainingJobName"])
    status = aws.training_status(described)
    assert status.state == "succeeded"  # moto completes jobs at once
    assert described["ResourceConfig"]["InstanceCount"] == 2


def test_a_container_argument_over_sagemakers_limit_is_refused_before_submitting(settings):
    every = {"model": "gbdt", "class_weight": "balanced", "epochs": 999, "patience": 99, "learning_rate": 0.000123,
             "batch_size": 4096, "hidden_sizes": [4096] * 8, "dropout": 0.123, "weight_decay": 0.000456,
             "numeric_embedding": "none", "trees": 99999, "tree_leaves": 4095, "tree_learning_rate": 0.0123}
    with pytest.raises(aws.AwsRequestError, match=r"at most 256 characters; '\{.*' has \d+"):
        aws.create_training_job_request(spec(hyperparameters=every), settings)


def test_training_status_carries_the_failure_reason():
    failed = aws.training_status({"TrainingJobStatus": "Failed", "FailureReason": "AlgorithmError: CUDA out of memory",
                                  "SecondaryStatus": "Failed"})
    assert (failed.state, failed.detail) == ("failed", "AlgorithmError: CUDA out of memory")
    running = aws.training_status({"TrainingJobStatus": "InProgress", "SecondaryStatus": "Downloading"})
    assert (running.state, running.detail) == ("running", "Downloading")
    done = aws.training_status({"TrainingJobStatus": "Completed", "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"}})
    assert done.artifact == "s3://b/m.tar.gz"


def test_spot_without_checkpoints_is_refused(settings):
    with pytest.raises(aws.AwsRequestError, match="spot instances but has no checkpoint_uri"):
        aws.create_training_job_request(spec(checkpoint_uri=None), settings)
    on_demand = settings.model_copy(update={"spot": False})
    request = aws.create_training_job_request(spec(checkpoint_uri=None), on_demand)
    assert request["EnableManagedSpotTraining"] is False and "MaxWaitTimeInSeconds" not in request["StoppingCondition"]


def test_a_local_uri_is_refused_with_its_name(settings):
    with pytest.raises(aws.AwsRequestError, match="the training set must be an s3:// URI.*file:///tmp/x"):
        aws.create_training_job_request(spec(input_uri="file:///tmp/x"), settings)


def test_botocore_names_every_bad_field():
    with pytest.raises(aws.AwsRequestError) as err:
        aws.validated("sagemaker", "CreateTrainingJob", {"TrainingJobName": "x", "ResourceConfig": {"InstanceCount": "2"},
                                                         "Bogus": 1})
    message = str(err.value)
    assert 'Missing required parameter in input: "RoleArn"' in message
    assert 'Unknown parameter in input: "Bogus"' in message
    assert "ResourceConfig.InstanceCount" in message


def test_endpoint_requests_and_moto_serves_them(settings, sagemaker, moto_server):
    import boto3

    plain = settings.model_copy(update={"subnets": [], "security_group_ids": [], "kms_key_id": ""})
    model = aws.create_model_request("customer-churn-v3", "s3://data/mlflow/1/abc/artifacts/model", plain,
                                     {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"})
    assert model["PrimaryContainer"]["Environment"]["MLFACTORY_MODEL_URI"] == "s3://data/mlflow/1/abc/artifacts/model"
    assert model["PrimaryContainer"]["Environment"]["MLFACTORY_RUNTIME"] == "aws"  # the server reads SageMaker's conventions
    # the endpoint's variants and the batch transforms run as the serving role, never the training one; without
    # one configured, as role_arn (the configs written before the two were split)
    assert model["ExecutionRoleArn"] == SERVING_ROLE
    unsplit = plain.model_copy(update={"serving_role_arn": ""})
    assert aws.create_model_request("m", "s3://data/mlflow/m", unsplit)["ExecutionRoleArn"] == ROLE
    with pytest.raises(ValueError, match="serving_role_arn 'my-role' is not an IAM role ARN"):
        AwsSettings(role_arn=ROLE, serving_role_arn="my-role", image_uri=IMAGE)
    sagemaker.create_model(**model)
    blue = aws.Variant("blue", "customer-churn-v3", 90, "ml.m5.large", 1)
    green = aws.Variant("green", "customer-churn-v3", 10, "ml.m5.large", 1)
    config = aws.endpoint_config_request("customer-churn-v3", [blue, green], plain)
    assert [v["InitialVariantWeight"] for v in config["ProductionVariants"]] == [90.0, 10.0]
    sagemaker.create_endpoint_config(**config)
    sagemaker.create_endpoint(**aws.create_endpoint_request("customer-churn", "customer-churn-v3", plain))
    described = sagemaker.describe_endpoint(EndpointName="customer-churn")
    assert aws.endpoint_state(described).state == "succeeded"
    assert {v["VariantName"] for v in described["ProductionVariants"]} == {"blue", "green"}

    assert aws.endpoint_name(endpoint()) == "customer-churn" and aws.model_name_for(MODEL) == "customer-churn-v3"
    assert aws.endpoint_variant(endpoint(min_replicas=2), "customer-churn-v3", plain, weight=0.0) == \
        aws.Variant("v3", "customer-churn-v3", 0.0, "ml.m5.large", 2)
    assert aws.config_variants(sagemaker.describe_endpoint_config(EndpointConfigName="customer-churn-v3")) == [blue, green]
    target, policy = aws.autoscaling_requests(endpoint(max_replicas=2, target_requests_per_replica=1000), "blue")
    scaling = boto3.client("application-autoscaling", endpoint_url=moto_server, region_name="us-east-1")
    scaling.register_scalable_target(**target)
    scaling.put_scaling_policy(**policy)
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [
        ("endpoint/customer-churn/variant/blue", 1, 2)]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    tracking = policies[0]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 1000.0
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"


def test_the_blue_green_update_and_the_weights_requests_pass_botocores_stubber(settings):
    import boto3
    from botocore.stub import Stubber

    request = aws.update_endpoint_request("customer-churn", "customer-churn-v4", ["customer-churn-5xx"])
    policy = request["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert policy == {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}  # the traffic moves by weights, not here
    assert request["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "customer-churn-5xx"}]}
    assert "AutoRollbackConfiguration" not in aws.update_endpoint_request("customer-churn", "customer-churn-v4", [])[
        "DeploymentConfig"]
    weights = aws.weights_request("customer-churn", {"v3": 90, "v4": 10})
    assert weights["DesiredWeightsAndCapacities"] == [{"VariantName": "v3", "DesiredWeight": 90.0},
                                                      {"VariantName": "v4", "DesiredWeight": 10.0}]
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/customer-churn"},
                          expected_params=request)
        stub.add_response("update_endpoint_weights_and_capacities",
                          {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/customer-churn"},
                          expected_params=weights)
        client.update_endpoint(**request)  # the Stubber validates the parameters against the service model
        client.update_endpoint_weights_and_capacities(**weights)
        stub.assert_no_pending_responses()
    invoke = aws.invoke_request("customer-churn", [{"tenure": 3}], variant="v4")
    assert invoke["TargetVariant"] == "v4" and json.loads(invoke["Body"]) == {"dataframe_records": [{"tenure": 3}]}
    assert "TargetVariant" not in aws.invoke_request("customer-churn", [{"tenure": 3}])


def test_the_transform_request_and_moto_runs_it(settings, sagemaker):
    plain = settings.model_copy(update={"subnets": [], "security_group_ids": [], "kms_key_id": ""})
    sagemaker.create_model(**aws.create_model_request("customer-churn-v3", "s3://data/mlflow/model", plain))
    batch = BatchJobSpec(name="score-2026-11-22", model=MODEL, inputs={"abc": "s3://data/curated/ingest_date=2026-11-22/"},
                         output_uri="s3://data/predictions/batch/run=score-2026-11-22/", instances=3)
    request = aws.transform_job_request("score-2026-11-22", "customer-churn-v3", "s3://data/curated/ingest_date=2026-11-22/",
                                        batch, plain)
    assert request["TransformInput"]["ContentType"] == "application/vnd.apache.parquet"
    assert request["TransformResources"] == {"InstanceType": "ml.m5.xlarge", "InstanceCount": 3}
    sagemaker.create_transform_job(**request)
    status = aws.transform_status(sagemaker.describe_transform_job(TransformJobName="score-2026-11-22"))
    assert status.state == "succeeded"
    # a transform runs as its model's role: the serving one
    assert sagemaker.describe_model(ModelName="customer-churn-v3")["ExecutionRoleArn"] == SERVING_ROLE


def test_names_are_made_valid_for_sagemaker():
    assert aws.job_name("asset_triggered__2026-11-22T03:01:33.730254+00:00_Ovy2krgw") == \
        "asset-triggered-2026-11-22T03-01-33-730254-00-00-Ovy2krgw"
    assert len(aws.job_name("x" * 100)) == 63
    assert not aws.job_name("-a-" + "b" * 60 + "--c").endswith("-")


def test_the_policies_grant_what_the_pipeline_needs_and_nothing_near_it():
    """The policy evaluator of the least-privilege check (test_aws_lifecycle reads every request Airflow sent
    from moto's recording): it grants the pipeline's own resources and refuses their neighbours."""
    from aws_iam import Call, allowed, policy, to_calls

    names = dict(MLFACTORY_BUCKET="b", MLFACTORY_LANDING_QUEUE="q", MLFACTORY_TRAINING_ROLE="t", MLFACTORY_SERVING_ROLE="s",
                 MLFACTORY_MODEL="churn", MLFACTORY_ENDPOINT="churn-live")
    airflow = policy("airflow-policy.json", **names)
    sm, iam = "arn:aws:sagemaker:us-east-1:123456789012", "arn:aws:iam::123456789012:role"
    # the condition keys of a create-only upload (If-None-Match: *), of any other object write, of a multipart part
    once, over, part = (("s3:ObjectCreationOperation", "true"), ("s3:if-none-match", "*")), \
        (("s3:ObjectCreationOperation", "true"),), (("s3:ObjectCreationOperation", "false"),)
    grants = [("s3:PutObject", "arn:aws:s3:::b/raw/abc/data.csv", once), ("s3:PutObject", "arn:aws:s3:::b/raw/abc/data.csv", part),
              ("s3:PutObject", "arn:aws:s3:::b/models/holdout/holdout.parquet", once),
              ("s3:PutObject", "arn:aws:s3:::b/curated/x.parquet", over), ("s3:DeleteObject", "arn:aws:s3:::b/raw/abc/.data.csv.1.tmp", ()),
              ("s3:DeleteObject", "arn:aws:s3:::b/curated/x.parquet", ()), ("sagemaker:CreateModel", f"{sm}:model/churn-v3", ()),
              ("sagemaker:UpdateEndpoint", f"{sm}:endpoint/churn-live", ()), ("sqs:DeleteMessage", "arn:aws:sqs:us-east-1:123456789012:q", ()),
              ("sagemaker:UpdateEndpointWeightsAndCapacities", f"{sm}:endpoint/churn-live", ()),
              ("sagemaker:InvokeEndpoint", f"{sm}:endpoint/churn-live", ()), ("iam:PassRole", f"{iam}/t", ()), ("iam:PassRole", f"{iam}/s", ())]
    refusals = [("s3:PutObject", "arn:aws:s3:::b/raw/abc/data.csv", over), ("s3:PutObject", "arn:aws:s3:::b/raw/abc/manifest.json", over),
                ("s3:PutObject", "arn:aws:s3:::b/models/holdout/holdout.json", over),  # an overwrite, or a copy onto them
                ("s3:DeleteObject", "arn:aws:s3:::b/raw/abc/data.csv", ()), ("s3:DeleteObject", "arn:aws:s3:::b/raw/abc/manifest.json", ()),
                ("s3:DeleteObject", "arn:aws:s3:::b/models/holdout/holdout.parquet", ()),
                ("s3:DeleteObject", "arn:aws:s3:::b/models/holdout/holdout.json", ()), ("s3:GetObject", "arn:aws:s3:::other/x", ()),
                ("sagemaker:CreateModel", f"{sm}:model/payroll-v1", ()), ("sagemaker:UpdateEndpoint", f"{sm}:endpoint/payroll", ()),
                ("sagemaker:DeleteEndpoint", f"{sm}:endpoint/churn-live", ()), ("sagemaker:DeleteModel", f"{sm}:model/churn-v3", ()),
                ("sagemaker:InvokeEndpoint", f"{sm}:endpoint/payroll", ()), ("iam:PassRole", f"{iam}/admin", ()),
                ("sqs:DeleteMessage", "arn:aws:sqs:us-east-1:123456789012:other", ()), ("s3:DeleteBucket", "arn:aws:s3:::b", ())]
    for action, resource, context in grants:
        assert allowed(airflow, Call(action, (resource,), "", context)), (action, resource, context)
    for action, resource, context in refusals:
        assert not allowed(airflow, Call(action, (resource,), "", context)), (action, resource, context)
    # ... the condition keys as the recorder reads them from the requests s3fs sends

    def sent(method: str, query: str = "", **headers) -> bool:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        (put, *_) = to_calls("s3", {"method": method, "url": f"http://moto/b/raw/abc/data.csv{query}"}, headers)
        return allowed(airflow, put)

    assert sent("PUT", if_none_match="*") and not sent("PUT")  # PutObject, create-only or not
    assert not sent("PUT", x_amz_copy_source="b/raw/_incoming/.data.csv.1.tmp")  # CopyObject: no create-only copy
    assert sent("POST", "?uploads") and sent("PUT", "?partNumber=1&uploadId=u")  # a multipart upload's start and parts
    assert sent("POST", "?uploadId=u", if_none_match="*") and not sent("POST", "?uploadId=u")  # ... and its completion

    # The training role reads its training set and writes models and checkpoints; the serving role (endpoints,
    # batch transforms) reads the registered model and the batch input and writes predictions. Neither writes raw/,
    # the holdout, curated data or the registry's prefix, nor reads the holdout.
    training, serving = policy("training-role-policy.json", MLFACTORY_BUCKET="b"), policy("serving-role-policy.json", MLFACTORY_BUCKET="b")

    def can(document, action, key):
        return allowed(document, Call(action, (f"arn:aws:s3:::b/{key}",), ""))

    assert can(training, "s3:GetObject", "models/training_sets/ab/part-0.parquet")
    assert can(training, "s3:PutObject", "models/runs/r1/trial-0/output/model.tar.gz")
    assert can(training, "s3:PutObject", "models/checkpoints/r1/trial-0/checkpoint.pt")
    assert can(serving, "s3:GetObject", "mlflow/1/models/m-1/artifacts/MLmodel")
    assert can(serving, "s3:GetObject", "predictions/batch/_manifests/run=x.json")
    assert can(serving, "s3:PutObject", "predictions/serving/part-1.parquet")
    for role in (training, serving):
        for action in ("s3:PutObject", "s3:DeleteObject"):
            for key in ("raw/abc/data.csv", "models/holdout/holdout.parquet", "mlflow/1/models/m-1/artifacts/MLmodel",
                        "curated/ingest_date=1/a.parquet"):
                assert not can(role, action, key), (action, key)
        assert not can(role, "s3:GetObject", "models/holdout/holdout.parquet")
    assert not can(serving, "s3:PutObject", "models/runs/r1/trial-0/output/model.tar.gz")
    assert not can(serving, "s3:GetObject", "models/training_sets/ab/part-0.parquet")
    assert not can(training, "s3:PutObject", "predictions/serving/part-1.parquet")
    # what both need to run a container (image, logs, VPC, KMS) is one policy beside theirs, with no data rights
    base = policy("sagemaker-role-policy.json", MLFACTORY_IMAGE_REPOSITORY="i", MLFACTORY_KMS_KEY_ID="k")
    assert not [s["Sid"] for s in base["Statement"] if "s3:" in json.dumps(s["Action"])]
    grant = next(s for s in base["Statement"] if "kms:CreateGrant" in s["Action"])
    assert grant["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    trust = policy("trust-policy.json")["Statement"][0]["Condition"]
    assert trust["StringEquals"]["aws:SourceAccount"] == "123456789012"
    assert trust["ArnLike"]["aws:SourceArn"] == "arn:aws:sagemaker:us-east-1:123456789012:*"



def test_the_backend_calls_exactly_the_operations_its_permissions_list():
    """Every AWS operation the aws backend's Airflow package calls (a boto3 client's method, or its name handed to one:
    a paginator, a describe, a create) is listed in deploy/aws/permissions.json, and every operation listed there is
    called: a grant for a call the code no longer makes is unused (test_deploy_manifests checks that the policy
    grants those actions and nothing else)."""
    import ast
    import re
    from pathlib import Path

    import botocore.session
    from botocore import xform_name
    from iam_scope import manifest

    session = botocore.session.get_session()
    operations: dict[str, set[str]] = {}  # python name -> {"service.Operation"}
    for service in ("sagemaker", "sagemaker-runtime", "sqs", "application-autoscaling", "cloudwatch", "s3"):
        for operation in session.get_service_model(service).operation_names:
            operations.setdefault(xform_name(operation), set()).add(f"{service}.{operation}")
    called = set()
    for path in (Path(__file__).resolve().parents[1] / "plugins" / "mlfactory_airflow" / "backends" / "aws").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and not (isinstance(node.value, ast.Name) and node.value.id == "storage"):
                called |= operations.get(node.attr, set())  # (the storage layer's functions are named for what they do)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                called |= operations.get(node.value, set())
    assert {"sagemaker.CreateTrainingJob", "sagemaker.CreateTransformJob", "sagemaker-runtime.InvokeEndpoint",
            "sqs.DeleteMessage", "s3.ListObjectsV2", "application-autoscaling.DeregisterScalableTarget"} <= called
    listed = {m[0] for part in manifest("aws")["airflow"].values() for key in part
              if (m := re.match(r"[a-z0-9-]+\.[A-Z]\w+", key))}
    assert called - listed == set(), "called but not in deploy/aws/permissions.json"
    assert listed - called == set(), "listed in deploy/aws/permissions.json but never called"
