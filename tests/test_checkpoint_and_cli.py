"""Checkpoints round-trip without pickle; `infgen decode` writes the requested size; extrapolation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import infgen
from infgen.model import InfGen, preset
from infgen.vae import FrozenVAE
from jobs.cli import main


@pytest.fixture
def checkpoint(tmp_path):
    model = InfGen(preset("tiny", in_distribution_scale=2.0))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # not the fresh init: a real round trip
    return model.eval(), infgen.save(model, tmp_path / "decoder", {"step": 7})


def test_checkpoint_round_trip(checkpoint):
    model, directory = checkpoint
    loaded = infgen.load(directory)
    latents = torch.randn(1, 4, 6, 5)
    assert torch.equal(model(latents, (40, 56)), loaded(latents, (40, 56)))
    assert loaded.config == model.config
    sidecar = json.loads((directory / "config.json").read_text())
    assert sidecar["metadata"] == {"step": 7} and sidecar["config"]["width"] == model.config.width
    assert set(load_file(directory / "model.safetensors")) == set(model.state_dict())
    assert infgen.load(directory / "model.safetensors").config == model.config  # the weights file works too


def test_loading_a_broken_checkpoint_names_the_problem(checkpoint, tmp_path):
    _, directory = checkpoint
    with pytest.raises(FileNotFoundError, match="not an InfGen checkpoint"):
        infgen.load(tmp_path / "nowhere")
    sidecar = json.loads((directory / "config.json").read_text())
    sidecar["config"]["width"] = 64  # weights no longer fit the config
    sidecar["config"]["num_heads"] = 4
    (directory / "config.json").write_text(json.dumps(sidecar))
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not match"):
        infgen.load(directory)
    sidecar["config"]["colour"] = "blue"
    (directory / "config.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="unknown InfGenConfig keys"):
        infgen.load(directory)


def test_decode_command_writes_the_requested_size(checkpoint, tmp_path):
    _, directory = checkpoint
    np.save(tmp_path / "z.npy", np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32))
    code = main(
        ["decode", "--checkpoint", str(directory), "--latents", str(tmp_path / "z.npy"), "--size", "45x30"]
        + ["--out", str(tmp_path / "out.png")]
    )
    assert code == 0
    for index in range(2):
        with Image.open(tmp_path / f"out_{index}.png") as image:
            assert image.size == (30, 45) and image.mode == "RGB"


def test_decode_command_reports_bad_input(checkpoint, tmp_path, capsys):
    _, directory = checkpoint
    np.save(tmp_path / "z.npy", np.zeros((3, 6, 5), dtype=np.float32))
    args = ["decode", "--checkpoint", str(directory), "--latents", str(tmp_path / "z.npy"), "--out", "x.png"]
    assert main([*args, "--size", "45x30"]) == 2
    assert "3 channels" in capsys.readouterr().err
    assert main([*args, "--size", "45by30"]) == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
    np.save(tmp_path / "z.npy", np.zeros((4, 6, 5), dtype=np.float32))
    assert main([*args, "--size", "200x200"]) == 2  # 200 > 2 × 48: beyond the range without --vae
    assert "--vae" in capsys.readouterr().err


def test_extrapolation_re_encodes_with_the_frozen_vae(checkpoint, tiny_vae_directory, tmp_path):
    model, directory = checkpoint
    vae = FrozenVAE.load(tiny_vae_directory)
    calls = []
    encode = vae.encode
    vae.encode = lambda images: calls.append(tuple(images.shape[2:])) or encode(images)
    latents = torch.randn(1, 4, 4, 4)  # 32² base, in-distribution up to 64²
    images = infgen.extrapolate(model, vae, latents, (256, 200))
    assert images.shape == (1, 3, 256, 200)
    assert calls == [(64, 50), (128, 100)]  # ×2 per step after one in-range decode
    np.save(tmp_path / "z.npy", latents.numpy())
    code = main(
        ["decode", "--checkpoint", str(directory), "--latents", str(tmp_path / "z.npy"), "--size", "256x200"]
        + ["--out", str(tmp_path / "big.png"), "--vae", str(tiny_vae_directory)]
    )
    assert code == 0 and Image.open(tmp_path / "big.png").size == (200, 256)


def test_decode_extrapolates_with_the_vae_its_checkpoint_records(checkpoint, tiny_vae_directory, tmp_path,
                                                                 capsys):  # fmt: skip
    model, _ = checkpoint
    # What training writes: the latent stage's geometry, whose `vae` names the VAE the latents came from.
    directory = infgen.save(model, tmp_path / "trained", {"latents": {"vae": str(tiny_vae_directory)}})
    np.save(tmp_path / "z.npy", torch.randn(1, 4, 4, 4).numpy())
    arguments = ["decode", "--checkpoint", str(directory), "--latents", str(tmp_path / "z.npy"),
                 "--size", "128x128", "--out", str(tmp_path / "big.png")]  # fmt: skip
    assert main(arguments) == 0
    assert str(tiny_vae_directory) in capsys.readouterr().out
    assert Image.open(tmp_path / "big.png").size == (128, 128)
    # --vae still wins: a VAE that does not exist fails, naming it, although the record names a good one
    assert main([*arguments, "--vae", str(tmp_path / "no_such_vae")]) != 0
    assert "no_such_vae" in capsys.readouterr().err


def test_decode_beyond_the_range_without_a_recorded_vae_says_so(checkpoint, tmp_path, capsys):
    _, directory = checkpoint  # saved with {"step": 7}: no latent geometry
    np.save(tmp_path / "z.npy", torch.randn(1, 4, 4, 4).numpy())
    arguments = ["decode", "--checkpoint", str(directory), "--latents", str(tmp_path / "z.npy"),
                 "--size", "128x128", "--out", str(tmp_path / "big.png")]  # fmt: skip
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "records no VAE" in error and "--vae" in error and str(directory) in error


def test_a_recorded_embedded_vae_is_loaded_by_the_stages_loader(checkpoint, tmp_path, monkeypatch):
    from jobs import decode_command

    model, _ = checkpoint
    directory = infgen.save(model, tmp_path / "trained", {"latents": {"vae": None}})  # null: the substitute
    assert decode_command.recorded_vae(str(directory)) == (True, None)
    assert decode_command.recorded_vae(str(checkpoint[1])) == (False, None)
    loaded = []
    monkeypatch.setattr("pipelines.common.vae_source.load_frozen_vae",
                        lambda source, device: loaded.append(source) or ("vae", "label"))  # fmt: skip
    options = decode_command.DecodeOptions(checkpoint=str(directory), latents="z.npy", size="128x128",
                                           out="x.png")  # fmt: skip
    assert (
        decode_command.extrapolation_vae(options, model, torch.zeros(1, 4, 4, 4), (128, 128), [], None)
        == "vae"
    )
    assert loaded == [None]


def test_train_options_override_the_preset_warm_start_and_refuse_unknown_values():
    from jobs.options import from_mapping
    from jobs.train_command import TrainOptions, build_config

    base = {"preset": "stage1-demo", "latents": "l", "images": "i", "output": "o"}
    assert build_config(from_mapping(TrainOptions, base, "train")).warm_start == "vae"
    cold = build_config(from_mapping(TrainOptions, {**base, "warm-start": "none"}, "train"))
    assert cold.warm_start == "none"
    with pytest.raises(ValueError, match="warm"):
        build_config(from_mapping(TrainOptions, {**base, "warm-start": "random"}, "train"))


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_command_ends_with_one_line(
    checkpoint, tiny_vae_directory, tmp_path, signal_name, code
):
    """Ctrl-C (SIGINT) or `ray job stop` (SIGTERM) in the middle of a command: one line on stderr, no
    traceback, the shell's exit status. Sent once the command prints that its long part has begun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model, _ = checkpoint
    directory = infgen.save(model, tmp_path / "trained", {"latents": {"vae": str(tiny_vae_directory)}})
    np.save(tmp_path / "z.npy", torch.randn(16, 4, 4, 4).numpy())
    arguments = ["decode", "--checkpoint", str(directory), "--latents", str(tmp_path / "z.npy"),
                 "--size", "4096x4096", "--out", str(tmp_path / "big.png")]  # fmt: skip
    # A shell's background job (CI runners, nohup ... &) starts with SIGINT ignored, which Python then keeps:
    # give the command the default disposition, as a terminal's foreground job has.
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:  # blocks until the command says it is extrapolating
            if line.startswith("extrapolating in"):
                break
            assert time.monotonic() < deadline
        process.send_signal(getattr(signal, signal_name))
        _, error = process.communicate(timeout=120)
    finally:
        process.kill()  # a command that did not stop must not decode on after a failed test
    assert process.returncode == code, error
    assert "Traceback" not in error
    assert error.strip().splitlines()[-1].startswith("infgen decode: interrupted")
    assert not (tmp_path / "big_0.png").exists() and not (tmp_path / "big.png").exists()


def test_a_stage_error_raised_on_a_ray_worker_is_found_inside_the_wrapping():
    """A damaged shard found by a training worker reaches the driver inside Ray Train's worker group error,
    and one found by a task inside the chain of causes: the command prints its one line either way."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from jobs.cli import stage_error_within
    from pipelines.common.errors import StageError

    damaged = StageError("shard /x/00001.parquet does not hold the bytes the latents stage wrote")
    wrapped = WorkerGroupError("1 worker failed", {0: RuntimeError("collective timed out"), 1: damaged})
    assert stage_error_within(wrapped) is damaged
    try:
        try:
            raise damaged
        except StageError as error:
            raise RuntimeError("UDF failed to process a data block") from error
    except RuntimeError as outer:
        assert stage_error_within(outer) is damaged
    assert stage_error_within(RuntimeError("no stage error here")) is None
