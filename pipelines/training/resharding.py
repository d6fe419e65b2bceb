"""Loading a training checkpoint on another number of workers than the one that wrote it.

ZeRO 0 keeps each engine's whole optimizer state in one file (mp_rank_00_model_states.pt) that every rank
loads: it loads on any worker count as it is. ZeRO ≥ 1 partitions the fp32 master weights and Adam moments
over the workers that wrote them (one *zero_pp_rank_R_mp_rank_00_optim_states.pt per worker), and DeepSpeed
0.19 refuses such a checkpoint on another data-parallel world size ("Automatic adjustment of ZeRO's optimizer
state partitioning with a new world size is not currently supported"; its `elastic_checkpoint` option is
consulted only after that refusal). So a partitioned checkpoint of another worker count is converted to a
universal checkpoint (deepspeed.checkpoint.ds_to_universal: one folder per parameter with its fp32 weights,
moments and step, no partitions), which engines built with `checkpoint.load_universal` load on any worker
count, each rank taking its new partition. The conversion runs once per node (its local rank 0, into a
temporary folder the node's workers share), is deleted once every rank has loaded it, and leaves the run's
checkpoint untouched; the next checkpoint is an ordinary one of the new worker count.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

ENGINES = ("generator", "discriminator")  # the engine folders of a training checkpoint (loop.py)


def saved_partitions(engine_directory: str) -> int:
    """How many workers' partitions of the optimizer state the engine's latest DeepSpeed checkpoint holds:
    0 for a ZeRO 0 checkpoint (not partitioned)."""
    latest = os.path.join(engine_directory, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {engine_directory} (no 'latest' tag file)")
    with open(latest) as handle:
        tag = handle.read().strip()
    return len(glob.glob(os.path.join(engine_directory, tag, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def needs_universal(directory: str, zero_stage: int, workers: int) -> bool:
    """Whether the training checkpoint in `directory` must be converted to load on `workers` workers."""
    if zero_stage < 1:
        return False
    for engine in ENGINES:
        partitions = saved_partitions(os.path.join(directory, engine))
        if partitions == 0:
            raise ValueError(
                f"{directory}/{engine}: a ZeRO 0 checkpoint (no optimizer partitions), this run uses ZeRO "
                f"stage {zero_stage}: the zero stage decides the checkpoint's layout and cannot change"
            )
        if partitions != workers:
            return True
    return False


def to_universal(directory: str, output: str) -> None:
    """Convert both engines' latest checkpoints in `directory` into `output`/<engine>/ (with its
    latest_universal tag file). In process (one extraction and merge worker): Ray Train workers should not
    fork pools. DeepSpeed's progress lines are kept out of the log unless the conversion fails."""
    from deepspeed.checkpoint.ds_to_universal import main as convert

    for engine in ENGINES:
        with open(os.path.join(directory, engine, "latest")) as handle:
            tag = handle.read().strip()
        arguments = argparse.Namespace(
            input_folder=os.path.join(directory, engine, tag),
            output_folder=os.path.join(output, engine, f"{tag}_universal"),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # checkpoints of engines that do not declare universal-checkpoint info (ours: no tensor
            # parallelism) get DeepSpeed's default one, so every checkpoint written so far converts
            inject_missing_state=True,
        )
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                convert(arguments)
        except Exception as error:
            raise RuntimeError(
                f"converting the {engine} checkpoint {arguments.input_folder} to a universal one failed: "
                f"{error}\n{captured.getvalue()[-3000:]}"
            ) from error


@contextlib.contextmanager
def loadable_checkpoint(directory: str, zero_stage: int, local_rank: int) -> Iterator[tuple[str, bool]]:
    """(the folder the engines load from, whether it is universal) for the training checkpoint in
    `directory`: `directory` itself when its partitions match this run's worker count, else a universal
    conversion of it. Every rank of the process group must enter this together (it synchronises them)."""
    import torch.distributed as dist

    if not needs_universal(directory, zero_stage, dist.get_world_size()):
        yield directory, False
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)  # one folder name on every node
    output = os.path.join(tempfile.gettempdir(), f"infgen-universal-{token[0]}")
    try:
        if local_rank == 0:
            to_universal(directory, output)
        dist.barrier()
        yield output, True
        dist.barrier()  # every rank of this node has loaded it
    finally:
        if local_rank == 0:
            shutil.rmtree(output, ignore_errors=True)
