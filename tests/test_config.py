from pathlib import Path

import pytest
import yaml

from mlfactory.config import DEFAULT_CONFIG, ConfigError, load_config
from mlfactory.features import FeatureSet


def write_config(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    mutate(raw)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sample_config_parses_into_typed_models(cfg, bucket):
    from mlfactory.backends.local import LocalSettings

    assert isinstance(cfg.backend, LocalSettings) and cfg.backend.name == "local" and cfg.backend.port == 8090
    assert cfg.dataset.task == "classification" and cfg.dataset.target == "churned"
    assert cfg.dataset.column("age").min == 18 and cfg.dataset.column("plan").categories == ["basic", "standard", "premium"]
    assert cfg.storage.landing_uri == bucket.as_uri() + "/landing"
    assert cfg.dataset.target not in FeatureSet.of(cfg.dataset).raw_inputs


def test_relative_bucket_resolves_against_the_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFACTORY_BUCKET", raising=False)
    path = write_config(tmp_path, lambda raw: raw["storage"].update(bucket="data/bucket"))
    assert load_config(path).storage.bucket == (tmp_path / "data" / "bucket").as_uri()


def test_config_path_comes_from_the_environment(tmp_path, monkeypatch):
    path = write_config(tmp_path, lambda raw: raw["dataset"].update(name="my_data"))
    monkeypatch.setenv("MLFACTORY_CONFIG", str(path))
    assert load_config().dataset.name == "my_data"


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda raw: raw["dataset"]["columns"][2].update(min="eighteen"), "dataset.columns[2] (age).min"),
        (lambda raw: raw["dataset"].update(target="nope"), "target 'nope' is not one of the columns"),
        (lambda raw: raw["dataset"].update(task="clustering"), "dataset.task"),
        (lambda raw: raw["dataset"]["columns"][8].update(categories=[]), "column 'plan': 'categories' is empty"),
        (lambda raw: raw["validation"].update(max_quarantine_fraction=1.5), "validation.max_quarantine_fraction"),
        (lambda raw: raw.update(colour="blue"), "colour: Extra inputs are not permitted"),
        (lambda raw: raw["storage"].update(bucket="ftp://host/x"), "unsupported bucket scheme 'ftp'"),
        (lambda raw: raw["dataset"]["derived"][0].update(inputs=["plan", "age"]), "needs integer or float input"),
        (lambda raw: raw["dataset"].update(task="regression"), "a regression target must be integer or float"),
        (lambda raw: raw["training"]["search_space"].update(momentum=[0.9]), "unknown hyperparameter(s) ['momentum']"),
        (lambda raw: raw["training"]["search_space"].update(dropout=[]), "no candidate values for ['dropout']"),
        (lambda raw: raw["training"]["search_space"].update(model=["forest"]), "search_space.model lists ['forest']"),
        (lambda raw: raw["training"]["search_space"].update(epochs=[0, 5]),
         "search_space.epochs lists [0]; epochs: Input should be greater than or equal to 1"),
        (lambda raw: raw["training"].update(model="forest"), "training.model"),
        (lambda raw: raw["training"].update(epochs=0), "training.epochs"),
        (lambda raw: raw["promotion"].update(holdout_fraction=0.9), "promotion.holdout_fraction"),
        (lambda raw: raw.update(backend="aws"), "backend aws needs its section 'aws:' (role_arn and image_uri at least)"),
        (lambda raw: raw.update(backend="aws", aws={"role_arn": "arn:aws:iam::123456789012:role/r", "image_uri": "i"}),
         "backend aws needs an s3:// bucket"),
        (lambda raw: raw.update(aws={"role_arn": "my-role", "image_uri": "i"}), "role_arn 'my-role' is not an IAM role ARN"),
        (lambda raw: raw.update(aws={"role_arn": "arn:aws:iam::123456789012:role/r", "image_uri": "i", "subnets": ["s"]}),
         "a VPC config needs both subnets and security_group_ids"),
        (lambda raw: raw.update(backend="kubernetes"), "backend: 'kubernetes' is not a registered backend; registered: aws, azure, gcp, local"),
        (lambda raw: raw.update(backend=["local"]), "backend: ['local'] is not a registered backend"),
        (lambda raw: raw.update(local={"port": 0}), "local.port: Input should be greater than or equal to 1"),
        (lambda raw: raw.update(local={"colour": "blue"}), "local.colour: Extra inputs are not permitted"),
        (lambda raw: raw.update(local="fast"), "local: expected a mapping of local settings, got str"),
        (lambda raw: raw.update(backend="aws", aws={"image_uri": "i"}), "aws.role_arn: Field required"),
        (lambda raw: raw.update(aws={"role_arn": "arn:aws:iam::123456789012:role/r", "image_uri": "i",
                                     "endpoint_min_instances": 2, "canary_wait_s": 60}),
         "aws.canary_wait_s is now serving.canary_wait_s; aws.endpoint_min_instances is now serving.min_replicas"),
        (lambda raw: raw["serving"].update(min_replicas=3, max_replicas=2), "min_replicas 3 is greater than max_replicas 2"),
        (lambda raw: raw["serving"].update(port=8090), "serving.port is now local.port"),
        (lambda raw: raw["serving"].update(colour="blue"), "serving.colour: Extra inputs are not permitted"),
        (lambda raw: raw["serving"].update(accelerator={"kind": "gpu"}), "a gpu job needs count >= 1"),
        (lambda raw: raw["training"].update(accelerator={"kind": "cpu", "count": 2}), "a cpu job has no accelerator count"),
        (lambda raw: raw["training"].update(retries=-1), "training.retries"),
        (lambda raw: raw["training"].update(queue=""), "training.queue"),
        (lambda raw: raw.update(local={"endpoint_url": "model-server:8080"}),
         "local.endpoint_url: Value error, 'model-server:8080' is not http(s)://host:port"),
        (lambda raw: raw.update(local={"endpoint_url": "http://model-server:8080"}),
         "local.endpoint_url and local.admin_url go together"),
        (lambda raw: raw.update(local={"token": "abc"}), "local.token has 3 characters; use at least 16"),
        (lambda raw: raw.update(local={"token": "x" * 20, "admin_token": "x" * 20}),
         "local.token and local.admin_token must differ"),
        (lambda raw: raw.update(local={"port": 9000, "admin_port": 9000}), "local.admin_port must differ from local.port"),
    ],
)
def test_a_wrong_config_names_the_field_and_the_file(tmp_path, bucket, mutate, needle):
    path = write_config(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_unset_variable_are_named(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "absent.yaml")
    path = tmp_path / "env.yaml"
    path.write_text(DEFAULT_CONFIG.read_text().replace("${MLFACTORY_BUCKET:-../.mlfactory/bucket}", "${MY_BUCKET}"))
    monkeypatch.delenv("MY_BUCKET", raising=False)
    with pytest.raises(ConfigError, match="environment variable MY_BUCKET is not set"):
        load_config(path)


def test_errors_in_the_backend_section_and_elsewhere_are_reported_together(tmp_path, bucket):
    def both(raw):
        raw.update(backend="aws", aws={"role_arn": "nope", "image_uri": "i"})
        raw["training"].update(epochs=0)

    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, both))
    assert "role_arn 'nope' is not an IAM role ARN" in str(err.value) and "training.epochs" in str(err.value)


def test_the_backend_section_is_the_settings_of_the_chosen_backend(tmp_path, bucket):
    from mlfactory.backends.aws import AwsSettings

    def aws(raw):
        raw.update(backend="aws", aws={"role_arn": "arn:aws:iam::123456789012:role/r", "image_uri": "i", "spot": False})
        raw["storage"]["bucket"] = "s3://data"

    cfg = load_config(write_config(tmp_path, aws))
    assert isinstance(cfg.backend, AwsSettings) and cfg.backend.spot is False and cfg.backend.name == "aws"
    assert cfg.model_dump()["backend"]["role_arn"] == "arn:aws:iam::123456789012:role/r"  # serialised whole
    # another backend's section may stay in the file (checked, not used): switching is one word
    local = load_config(write_config(tmp_path, lambda raw: aws(raw) or raw.update(backend="local") or
                                     raw["storage"].update(bucket="data")))
    assert local.backend.name == "local"
