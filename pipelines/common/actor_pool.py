"""The Ray wiring the stages share: one work item per row, mapped by a pool of actors that each load their
models once (one GPU each when the cluster has GPUs, else one CPU), results streamed back as they finish."""

from __future__ import annotations

from collections.abc import Iterator

import ray


def map_with_actor_pool(
    rows: list[dict], actor: type, size: int, constructor_kwargs: dict, memory_gib: float | None = None
) -> Iterator[dict]:
    """`memory_gib`: host memory each actor reserves in Ray's scheduler (None: no reservation)."""
    resources = {}
    if memory_gib is not None:
        resources["memory"] = int(memory_gib * 2**30)
        _warn_if_no_node_fits(actor.__name__, memory_gib)
    # What an actor raised comes back as itself (a damaged shard's StageError: one line naming the file), not
    # as a UserCodeException that keeps only its traceback's text.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    mapped = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        actor,
        batch_size=1,
        batch_format="numpy",
        # One item per actor at a time: items are long (a whole shard), and Ray Data's default queues two on
        # the first actor to start, which left the other idle (seen: 2 shards, 2 actors, one did both).
        compute=ray.data.ActorPoolStrategy(size=min(size, len(rows)), max_tasks_in_flight_per_actor=1),
        num_gpus=gpus_per_worker(),
        num_cpus=1,
        fn_constructor_kwargs=constructor_kwargs,
        **resources,
    )
    return mapped.iter_rows()


def gpus_per_worker() -> int:
    """One GPU per actor or task when the cluster has GPUs, else none (Ray then hides every GPU from it)."""
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def _warn_if_no_node_fits(name: str, memory_gib: float) -> None:
    # Not an error: an autoscaling cluster may add a node that fits. Without one the actors wait forever,
    # so say why before they do.
    offered = [node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")]
    largest = max(offered, default=0)
    if memory_gib * 2**30 > largest:
        print(
            f"warning: each {name} actor reserves {memory_gib:g} GiB of memory, and no node of this "
            f"cluster offers Ray that much now (largest {largest / 2**30:.1f} GiB): the actors wait until "
            "a node that fits joins. Lower the memory setting (infgen latents: --encoder-memory-gib) if none "
            "will.",
            flush=True,
        )
