"""The ingest and latent stages on an S3-compatible object store, end to end: moto in server mode on
127.0.0.1 with IAM authentication on (a wrong or missing secret is refused), real s3fs, real Ray, real
img2dataset over the embedded source, real MLflow (SQLite).

The stages run in a driver process of their own that joins the session's Ray cluster, as a driver joins a
real cluster: the credentials exist only in that driver's environment (moto makes them after the cluster
started), so the Ray workers that read and write the bucket can only have them from the stage environment
(jobs/stage_environment.py). The secret must reach them and appear nowhere the project writes or prints.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

BUCKET = "infgen-object-store"
ROWS, SEED, SHARD = 16, 10, 8
# moto answers this many requests without authentication: creating the user, its key and its policy.
UNAUTHENTICATED_SETUP_REQUESTS = 3
ALLOW_ALL_S3 = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}  # fmt: skip

# One driver process: ingest, then latents reading the ingest from the bucket (what each call prints is
# the test's evidence of what it did).
DRIVER = """
import json, sys, time
from jobs.cli import run_arguments
for arguments in json.loads(sys.argv[1]):
    started = time.perf_counter()
    run_arguments(arguments)
    print(f"=== infgen {arguments[0]} done in {time.perf_counter() - started:.1f}s", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with an IAM user allowed s3:*, its access key and a bucket."""
    import boto3
    import requests

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    environment = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNAUTHENTICATED_SETUP_REQUESTS)}
    for name in [name for name in environment if name.startswith("AWS_")]:
        del environment[name]
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:  # poll until it answers, with a deadline
            assert server.poll() is None, f"moto server exited: {log.read_text()[-2000:]}"
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "moto server did not answer within 60 s"
                time.sleep(0.1)
        region = "us-east-1"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=region, aws_access_key_id="setup",
                           aws_secret_access_key="setup")  # fmt: skip
        iam.create_user(UserName="stage")
        key = iam.create_access_key(UserName="stage")["AccessKey"]
        iam.put_user_policy(UserName="stage", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_ALL_S3))
        credentials = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": region,
        }
        boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket=BUCKET)  # fmt: skip
        yield {"endpoint": endpoint, "credentials": credentials}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _bucket(s3_server, secret: str | None = None):
    import s3fs

    credentials = s3_server["credentials"]
    return s3fs.S3FileSystem(key=credentials["AWS_ACCESS_KEY_ID"],
                             secret=secret or credentials["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=s3_server["endpoint"], skip_instance_cache=True)  # fmt: skip


def _run_driver(commands: list[list[str]], environment: dict, log) -> str:
    finished = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], env=environment,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    printed = finished.stdout + finished.stderr
    log.write_text(printed)  # for whoever reads a failure; scanned for the secret like every file here
    assert finished.returncode == 0, printed[-5000:]
    return printed


@pytest.fixture(scope="module")
def object_store_run(ray_address, s3_server, tmp_path_factory):
    """Ingest and latents on s3://, run twice by a driver that joins the session's cluster: the bucket's
    objects after each run, and what each run printed."""
    root = tmp_path_factory.mktemp("object_store")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    ingest, latents = f"s3://{BUCKET}/run/ingest", f"s3://{BUCKET}/run/latents"
    context = ["--ray-address", ray_address, "--tracking-uri", tracking]
    commands = [
        ["ingest", "--embedded", str(ROWS), "--samples-per-shard", str(SHARD), "--seed", str(SEED),
         "--output", ingest, *context],
        ["latents", "--images", f"{ingest}/images", "--output", latents, "--preset", "smoke",
         "--encoders", "1", *context],
    ]  # fmt: skip
    # moto made this secret after the session's Ray started: its workers can only have it from the driver's
    # stage environment. The developer's own AWS settings (a profile, a session token) stay out of it.
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("AWS_") and name != "MLFLOW_TRACKING_URI"}  # fmt: skip
    environment.update(s3_server["credentials"])
    bucket = _bucket(s3_server)
    first = _run_driver(commands, environment, root / "first.log")
    objects_first = bucket.find(BUCKET, detail=True)
    second = _run_driver(commands, environment, root / "second.log")
    bucket.invalidate_cache()
    objects_second = bucket.find(BUCKET, detail=True)
    return {"root": root, "tracking": tracking, "ingest": ingest, "latents": latents, "bucket": bucket,
            "printed": (first, second), "objects": (objects_first, objects_second)}  # fmt: skip


def test_the_stages_write_their_shards_and_manifests_to_the_bucket(object_store_run):
    bucket = object_store_run["bucket"]
    ingest = json.loads(bucket.cat_file(f"{BUCKET}/run/ingest/manifest.json"))
    latents = json.loads(bucket.cat_file(f"{BUCKET}/run/latents/manifest.json"))
    assert ingest["status"] == latents["status"] == "complete"

    # every input row accounted for, and the kept ones are the rows of the image shards in the bucket
    counts = ingest["counts"]
    assert counts["input_rows"] == ROWS
    image_shards = sorted(bucket.glob(f"{BUCKET}/run/ingest/images/*.parquet"))
    assert [path.rsplit("/", 1)[-1] for path in image_shards] == [shard["name"] for shard in ingest["shards"]]
    assert len(image_shards) == -(-ingest["selection"]["rows"] // SHARD) >= 2
    kept = 0
    for path in image_shards:
        with bucket.open(path, "rb") as handle:
            kept += pq.read_table(handle, columns=["key"]).num_rows
    assert kept == counts["buckets"]["kept"] > 0

    # one latent shard per image shard, every image used or skipped with a reason, the samples in the shards
    latent_shards = sorted(bucket.glob(f"{BUCKET}/run/latents/0*.parquet"))
    names = [path.rsplit("/", 1)[-1] for path in latent_shards]
    assert names == [item["shard"] for item in latents["inputs"]]
    assert latents["counts"]["images"] == kept
    assert latents["counts"]["images_used"] + sum(latents["counts"]["skipped"].values()) == kept
    samples = 0
    for path in latent_shards:
        with bucket.open(path, "rb") as handle:
            samples += pq.read_table(handle, columns=["key"]).num_rows
    assert samples == latents["counts"]["samples"] > 0
    record = json.loads(bucket.cat_file(f"{BUCKET}/run/latents/latents.json"))
    assert record["geometry"]["latent_channels"] == latents["latent_shape"][0]
    assert not bucket.glob(f"{BUCKET}/run/*/_LOCK")  # released


def test_a_second_run_resumes_without_rework(object_store_run):
    first, second = object_store_run["printed"]
    assert "2 to encode, 0 done earlier" in first
    assert "ingest: selection: reusing" in second
    assert "ingest: download: all 2 shard(s) downloaded earlier" in second
    assert "0 to encode, 2 done earlier" in second
    before, after = object_store_run["objects"]
    assert set(after) == set(before)
    # only the records a finished stage rewrites at its end changed; no shard was written again
    rewritten = {path for path in before if before[path]["LastModified"] != after[path]["LastModified"]}
    rewritten |= {path for path in before if before[path]["ETag"] != after[path]["ETag"]}
    assert rewritten == {f"{BUCKET}/run/ingest/manifest.json", f"{BUCKET}/run/latents/manifest.json",
                         f"{BUCKET}/run/latents/latents.json"}  # fmt: skip


def test_the_bucket_refuses_a_wrong_secret(object_store_run, s3_server):
    # what makes the other tests proof that the stage's workers held the real secret
    with pytest.raises(PermissionError):
        _bucket(s3_server, secret="not-the-secret").cat_file(f"{BUCKET}/run/ingest/manifest.json")


def test_the_secret_appears_in_no_file_no_mlflow_record_and_no_output(object_store_run, s3_server):
    import mlflow

    secret = s3_server["credentials"]["AWS_SECRET_ACCESS_KEY"]
    for printed in object_store_run["printed"]:
        assert secret not in printed
    bucket = object_store_run["bucket"]
    for path in object_store_run["objects"][1]:
        assert secret.encode() not in bucket.cat_file(path), path
    local = [path for path in object_store_run["root"].rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in local)
    for path in local:
        assert secret.encode() not in path.read_bytes(), path
    client = mlflow.MlflowClient(object_store_run["tracking"])
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert {run.data.tags["mlflow.runName"] for run in runs} == {"ingest", "latents"}
    assert any(value.startswith(f"s3://{BUCKET}/") for run in runs for value in run.data.params.values())
    for run in runs:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert secret not in value
