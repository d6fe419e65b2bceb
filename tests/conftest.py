import pytest
import torch

# Deliberately not SD's 0.18215 / 0: tests can tell values read from config.json from defaults.
TINY_VAE_SCALING_FACTOR = 0.5
TINY_VAE_SHIFT_FACTOR = 0.1


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same RNG state, so a failure reproduces exactly.
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_vae_directory(tmp_path_factory):
    """A tiny randomly initialised KL-f8 AutoencoderKL saved with save_pretrained (real diffusers format)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,  # 4 levels → 3 downsamplings → ×8
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        norm_num_groups=4,
        layers_per_block=1,
        latent_channels=4,
        scaling_factor=TINY_VAE_SCALING_FACTOR,
        shift_factor=TINY_VAE_SHIFT_FACTOR,
    )
    directory = tmp_path_factory.mktemp("tiny_vae")
    autoencoder.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray cluster for the whole session; tests and the drivers they start connect to it."""
    import os

    import ray

    from jobs.ray_session import OFFLINE_ENVIRONMENT

    for name, value in {**OFFLINE_ENVIRONMENT, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(name, value)
    # With the dashboard, as jobs.ray_session starts an embedded cluster: Ray Train's placement-group cleaner
    # needs the State API it serves.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": OFFLINE_ENVIRONMENT})  # fmt: skip
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_images(ray_address, tmp_path_factory):
    """An ingest of the embedded source (img2dataset over 127.0.0.1): the images/ folder later stages read."""
    from jobs.cli import run_arguments

    root = tmp_path_factory.mktemp("embedded_ingest")
    arguments = ["ingest", "--embedded", "40", "--output", str(root / "ingest"), "--samples-per-shard", "12",
                 "--seed", "10", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]  # fmt: skip
    manifest = run_arguments(arguments)
    return {"images": root / "ingest" / "images", "manifest": manifest}


@pytest.fixture(scope="session")
def embedded_latents(embedded_images, tmp_path_factory):
    """The latent stage (smoke preset: 64² crops, the smallest geometry) over `embedded_images`."""
    from jobs.cli import run_arguments

    output = tmp_path_factory.mktemp("embedded_latents") / "latents"
    arguments = ["latents", "--images", str(embedded_images["images"]), "--output", str(output), "--preset",
                 "smoke", "--tracking-uri", f"sqlite:///{output.parent / 'mlflow.db'}"]  # fmt: skip
    manifest = run_arguments(arguments)
    return {"latents": output, "images": embedded_images["images"], "manifest": manifest}


@pytest.fixture(scope="session")
def stage1_small(embedded_latents, tmp_path_factory):
    """One uninterrupted `stage1-small` training run on `embedded_latents`, in this process: what the fault
    tests (a killed driver, a failed worker, a lost node) compare their resumed runs with, step for step."""
    import signal

    from pipelines.common.tracking import StageTracking
    from pipelines.training.config import STAGE1_SMALL
    from pipelines.training.stage import run_training

    storage = tmp_path_factory.mktemp("train")
    tracking = f"sqlite:///{storage / 'mlflow.db'}"
    latents, images = str(embedded_latents["latents"]), str(embedded_latents["images"])
    handler_before = signal.getsignal(signal.SIGINT)
    result = run_training(STAGE1_SMALL, latents, images, str(storage / "stage1"), StageTracking(tracking))
    return {"storage": storage, "tracking": tracking, "latents": latents, "images": images, "result": result,
            "sigint_handlers": (handler_before, signal.getsignal(signal.SIGINT))}  # fmt: skip
