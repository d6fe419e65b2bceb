"""The shared stage layer and the typed commands, without Ray: the run lock is atomic, an output is claimed
once, the latent record is the geometry everyone derives from, and options mean the same from a command line,
a workflow file and a Ray job's command line."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from jobs.options import from_mapping, output_defining, to_argv
from jobs.registry import COMMANDS
from jobs.workflow.records import config_hash
from pipelines.common.errors import StageError
from pipelines.common.latent_record import geometry, read_latent_record, record_path
from pipelines.common.run_lock import RunLock
from pipelines.common.stage_output import claim_output


# --- the run lock --------------------------------------------------------------------------------------
def _try_lock(path: str, start, results) -> None:
    start.wait()
    try:
        with RunLock(path):
            results.put("held")
            start.wait()  # hold it until every contender has tried
    except StageError:
        results.put("refused")
        start.wait()


def test_of_many_processes_racing_for_a_lock_exactly_one_holds_it(tmp_path):
    contenders = 6
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(contenders), context.Queue()
    processes = [context.Process(target=_try_lock, args=(str(tmp_path / "_LOCK"), start, results))
                 for _ in range(contenders)]  # fmt: skip
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in range(contenders))
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["held"] + ["refused"] * (contenders - 1)
    assert not (tmp_path / "_LOCK").exists()  # the holder removed it on the way out


def test_a_lock_whose_holder_was_killed_is_taken_over(tmp_path, capsys):
    lock = tmp_path / "_LOCK"
    code = (
        f"from pipelines.common.run_lock import RunLock\nRunLock({str(lock)!r}).__enter__()\n"
        "print('held', flush=True)\ninput()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=f"held by running process {holder.pid}"):
            RunLock(str(lock)).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(str(lock)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of finished process {holder.pid}" in capsys.readouterr().out


def test_a_lock_held_by_a_ray_job_names_the_job_to_stop(tmp_path):
    """A second copy of a stage submitted as a Ray job is refused at once, naming the first one's job."""
    lock = tmp_path / "_LOCK"
    code = (
        f"from pipelines.common.run_lock import RunLock\nRunLock({str(lock)!r}).__enter__()\n"
        "print('held', flush=True)\ninput()"
    )
    job_config = json.dumps({"metadata": {"job_submission_id": "infgen-demo-stage1-0123abcd"}})
    environment = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": job_config}
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=environment)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert json.loads(lock.read_text())["ray_job"] == "infgen-demo-stage1-0123abcd"
        with pytest.raises(StageError) as refused:
            RunLock(str(lock)).__enter__()
        message = str(refused.value)
        assert f"process {holder.pid}" in message
        assert "Ray job infgen-demo-stage1-0123abcd" in message
        assert "ray job stop infgen-demo-stage1-0123abcd" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# --- claiming an output --------------------------------------------------------------------------------
def test_an_output_is_claimed_once_and_resource_settings_may_change(tmp_path):
    wanted = {"config": {"seed": 0, "encoders": 2, "sizes": (64, 64)}, "inputs": [{"shard": "00000.parquet"}]}
    claim_output(str(tmp_path), "record.json", wanted, resource_fields=("encoders",))
    again = {**wanted, "config": {**wanted["config"], "encoders": 16}}  # a bigger cluster: same output
    assert (
        claim_output(str(tmp_path), "record.json", again, resource_fields=("encoders",))["config"]["encoders"]
        == 2
    )
    other = {**wanted, "config": {**wanted["config"], "seed": 1}}
    with pytest.raises(ValueError, match="holds latents made another way; use a new output folder"):
        claim_output(str(tmp_path), "record.json", other, ("encoders",), "latents made another way")


# --- the latent record ---------------------------------------------------------------------------------
def write_record(folder, input_side, target_sizes, holdout=0.25):
    folder.mkdir(parents=True, exist_ok=True)
    found = geometry(
        None, "substitute", (4, input_side // 8, input_side // 8), 0.5, 0.1, input_side, target_sizes
    )
    record = {"config": {"seed": 3, "holdout_fraction": holdout}, "inputs": [], "geometry": found}
    (folder / "latents.json").write_text(json.dumps(record))
    return read_latent_record(str(folder))


def test_the_latent_record_gives_the_geometry_later_stages_derive(tmp_path):
    from pipelines.common.crops import target_sizes
    from pipelines.latents.config import PRESETS

    stage1 = write_record(tmp_path / "stage1", 512, target_sizes(PRESETS["stage1"].policy))
    assert (stage1.latent_side, stage1.vae_downsample, stage1.latent_channels) == (64, 8, 4)
    assert stage1.in_distribution_scale == 2.0  # 512 → ≤ 1024
    assert stage1.validation_sizes() == ((512, 512), (1024, 1024), (512, 1024))
    stage2 = write_record(tmp_path / "stage2", 512, target_sizes(PRESETS["stage2"].policy))
    assert stage2.in_distribution_scale == 4.0  # 512 → ≤ 2048
    embedded = write_record(tmp_path / "embedded", 64, target_sizes(PRESETS["smoke"].policy))
    assert embedded.validation_sizes() == ((64, 64), (128, 128), (64, 128))
    assert (embedded.holdout_fraction, embedded.seed) == (0.25, 3)
    # a stage that trains on the smaller targets of a shared latent folder sees a smaller range
    limited = stage2.limited_to(1024)
    assert limited.in_distribution_scale == 2.0 and max(map(max, limited.target_sizes)) == 1024
    assert stage2.limited_to(None) is stage2
    with pytest.raises(ValueError, match="no target that small"):
        stage2.limited_to(256)


def test_the_training_decoder_takes_its_geometry_from_the_record(tmp_path):
    from pipelines.training.config import PRESETS
    from pipelines.training.stage import model_config

    record = write_record(tmp_path / "latents", 512, [(512, 512), (2048, 1024)])
    decoder = model_config(PRESETS["stage2"], record)
    assert (decoder.in_distribution_scale, decoder.latent_channels) == (4.0, 4)


def test_an_unfinished_latent_stage_is_named(tmp_path):
    (tmp_path / "latents.json").write_text(json.dumps({"config": {"seed": 0}, "inputs": []}))
    with pytest.raises(ValueError, match="has no geometry: the latent stage has not finished there"):
        read_latent_record(str(tmp_path))
    assert record_path(str(tmp_path)).endswith("/latents.json")


# --- typed options -------------------------------------------------------------------------------------
def test_options_mean_the_same_from_a_workflow_file_and_a_command_line():
    from jobs.cli import build_parser
    from jobs.options import from_namespace

    command = COMMANDS["evaluate"]
    mapping = {"decoder": "d", "images": "i", "sizes": [512, "768x1344"],
               "latent-file": ["a=x.npz", "b=y.npz"],
               "workers": 8, "max-images": 100}  # fmt: skip
    options = from_mapping(command.options, mapping, "evaluate", fixed={"output": "out"})
    argv = to_argv(options)
    assert argv[-2:] == ["--output", "out"] and argv.count("--latent-file") == 2
    parsed = from_namespace(command.options, build_parser().parse_args(["evaluate", *argv]))
    assert parsed == options
    with pytest.raises(ValueError, match="option 'workers': invalid int value: 'many'"):
        from_mapping(command.options, {**mapping, "workers": "many"}, "evaluate", fixed={"output": "out"})
    with pytest.raises(ValueError, match="needs option\\(s\\) 'images'"):
        from_mapping(command.options, {"decoder": "d"}, "evaluate", fixed={"output": "out"})


def test_shortening_a_run_keeps_its_gan_at_the_same_fraction_and_a_gan_past_the_end_is_refused():
    from jobs.train_command import TrainOptions, build_config

    def config(**given):
        return build_config(TrainOptions(preset="stage1", latents="l", images="i", output="o", **given))

    assert config().loss.gan_start_step == 50_000 and config().steps == 500_000
    assert config(steps=1000).loss.gan_start_step == 100  # the preset's 10 %, not 50 000 (never)
    assert config(steps=1000, gan_start_step=0).loss.gan_start_step == 0
    with pytest.raises(ValueError, match=r"gan_start_step \(1000\) must be below steps \(1000\)"):
        config(steps=1000, gan_start_step=1000)
    with pytest.raises(ValueError, match=r"gan_start_step \(600000\) must be below steps \(500000\)"):
        config(gan_start_step=600_000)


def test_the_config_hash_leaves_resource_options_out():
    base = ["latents", "--images", "i", "--preset", "embedded", "--output", "o"]
    same = config_hash("latents", base)
    assert same == config_hash("latents", [*base, "--encoders", "16", "--encoder-memory-gib", "0.5"])
    assert same != config_hash("latents", [*base, "--seed", "1"])
    assert config_hash("train", ["train", "--storage", "x", "--name", "y"]) is None  # an older command line
    options = from_mapping(
        COMMANDS["latents"].options, {"images": "i", "encoders": 4}, "latents", {"output": "o"}
    )
    assert "encoders" not in output_defining(options, COMMANDS["latents"].resource_fields())
