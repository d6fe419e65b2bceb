"""Device handling without a GPU: the checks that every module and its inputs share a device, and the
evaluation's scorer run with its device injected ("cpu"), the same code path a GPU actor runs with "cuda".

The LPIPS bug this guards against (CPU images fed to LPIPS on CUDA) is reproduced on a CPU-only machine with
the `meta` device as the "other" device: a network on meta given CPU tensors fails exactly as one on CUDA
would, so code that moves its inputs to the network's device passes and code that does not fails."""

import numpy as np
import pytest
import torch
from torch import nn

import infgen
from infgen.devices import assert_same_device, default_device, module_device
from pipelines.evaluation.chunks import plan_chunks
from pipelines.evaluation.config import EMBEDDED
from pipelines.evaluation.scoring import ChunkScorer, load_part, perceptual_distances, scoring_modules


def test_default_device_follows_what_torch_sees():
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_module_and_inputs_on_different_devices_are_named():
    module = nn.Linear(2, 2)
    assert assert_same_device(module, torch.zeros(1, 2)) == torch.device("cpu")
    with pytest.raises(ValueError, match="Linear is on cpu but its input 1 is on meta"):
        assert_same_device(module, torch.zeros(1, 2), torch.zeros(1, 2, device="meta"))
    split = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to("meta"))
    with pytest.raises(ValueError, match="Sequential: expected its weights on one device, found cpu, meta"):
        module_device(split)


def test_lpips_gets_its_inputs_on_its_own_device():
    from infgen.metrics.perceptual import load_lpips

    lpips = load_lpips(net="alex").eval().to("meta")  # the "GPU": not where the images are built
    prediction, target = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises((RuntimeError, NotImplementedError)):
        lpips(prediction, target)  # what the scorer used to do: the inputs left on the host
    distances = perceptual_distances(lpips, prediction, target)
    assert distances.device.type == "meta" and distances.shape == (2,)


@pytest.fixture(scope="module")
def scorer_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    torch.manual_seed(0)
    decoder = infgen.save(infgen.InfGen(infgen.preset("tiny", in_distribution_scale=2.0)), root / "decoder")
    latents = np.random.default_rng(1).standard_normal((4, 4, 8, 8)).astype(np.float32)
    np.save(root / "dit.npy", latents)
    return root, decoder, latents


def test_the_scorer_runs_on_an_injected_device(scorer_inputs):
    root, decoder, latents = scorer_inputs
    from pipelines.evaluation.chunks import Unit

    config = EMBEDDED.at_input_side(32)
    chunks = plan_chunks(str(root / "eval"), ((64, 64),), config.chunk_images,
                         lambda size: [Unit("dit", len(latents), file=str(root / "dit.npy"))])  # fmt: skip
    scorer = ChunkScorer(config, str(decoder), None, 32, chunks, threads=1, device="cpu")
    assert scorer.meta["device"] == "cpu"
    assert {name: module_device(module).type for name, module in scoring_modules(scorer.models).items()} == {
        "vae": "cpu",
        "infgen": "cpu",
        "inception": "cpu",
        "lpips": "cpu",
    }
    result = scorer({"index": np.array([0])})
    assert list(result["images"]) == [4]
    groups, meta = load_part(chunks[0].part)
    assert meta["device"] == "cpu"
    assert groups["infgen"]["pool"].shape[0] == 4 and np.isfinite(groups["infgen"]["pool"]).all()


def test_the_gpu_demo_workflow_loads_with_training_on_gpus():
    from jobs.train_command import build_config
    from jobs.workflow.spec import load_workflow, stage_options

    spec = load_workflow("bench/gpu_demo.yaml")
    assert [stage.command for stage in spec.stages] == ["ingest", "latents", "train", "train", "evaluate"]
    trains = [stage for stage in spec.stages if stage.command == "train"]
    configs = [build_config(stage_options(spec, stage, "RUN")) for stage in trains]
    assert [(config.use_gpu, config.num_workers) for config in configs] == [(True, 1), (True, 1)]
