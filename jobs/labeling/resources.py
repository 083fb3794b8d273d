"""How many model actors jobs.label runs, and what Ray reserves for each: GPUs when the cluster
has them, else one actor per node whose torch threads use the node's CPUs."""

from __future__ import annotations

from jobs.autoscaling import ask_autoscaler, wait_for_gpus
from jobs.common import JobError, ray_is_fixed

# How long a job on a cluster that may grow waits for the CPU that decoding needs beside the
# model actors (asking the autoscaler for it) before it stops; tests shorten it.
DECODE_CPU_WAIT_S = 60.0


def cpu_actor_sizing(node_cpus: list[float], num_actors: int | None, cpus_per_actor: float | None) -> tuple[int, float, int]:
    """Model actors without GPUs: (actors, CPUs Ray reserves for each, torch threads of each;
    0 = as many as its node has CPUs). ``node_cpus``: the CPUs of each node of the cluster.

    The model is all of the work (~0.5 s an image for R50-FPN; decoding one costs a few ms), so by
    default each node that has CPUs holds one actor whose torch threads use all its CPUs. Ray's
    accounting reserves it the node's CPUs less one, and that one CPU runs the decode, RLE and
    write tasks in the gaps of the model's work (torch's threads are not Ray's accounting). With
    ``--num-actors`` above the nodes, a node's actors share its CPUs; ``--cpus-per-actor`` given
    is both the reservation and the threads."""
    nodes = sorted(c for c in node_cpus if c >= 1) or [1.0]
    actors = num_actors or len(nodes)
    if cpus_per_actor is not None:
        return actors, float(cpus_per_actor), max(1, int(cpus_per_actor))
    per_node = -(-actors // len(nodes))
    smallest = nodes[0]
    reserve = (smallest - 1) / per_node
    if reserve > 1:  # whole CPUs above one, fractions only of one
        reserve = float(int(reserve))
    if reserve == 0 and len(nodes) > 1:
        # Actors that reserve nothing all land on one node; reserving its share spreads them
        # (the other nodes' spare CPUs decode).
        reserve = round(smallest / per_node, 4)
    threads = 0 if per_node == 1 else max(1, int(smallest // per_node))
    return actors, round(reserve, 4), threads


def actor_resources(ray, args) -> tuple[int, float, float, int]:
    """(model actors, GPUs and CPUs Ray reserves for each, torch threads of each on the CPU; 0 =
    its node's CPUs). Stops the job when they cannot start on a private local Ray. On a cluster
    that may grow, actors that would leave no CPU to decode with (Ray Data would wait for it for
    ever) ask the autoscaler for one more CPU and wait up to ``DECODE_CPU_WAIT_S`` for it, then
    stop the job naming --num-actors and --cpus-per-actor."""
    cluster = ray.cluster_resources()
    gpus = float(cluster.get("GPU", 0))
    # --wait-for-gpus says the job is meant for GPUs, also before the cluster has any.
    gpus_per_actor = args.gpus_per_actor if args.gpus_per_actor is not None else (1.0 if gpus >= 1 or args.wait_for_gpus > 0 else 0.0)
    cpus_per_actor = args.cpus_per_actor if args.cpus_per_actor is not None else 1.0
    if gpus_per_actor > 0:
        actors = args.num_actors or 1
        what = f"--gpus-per-actor {gpus_per_actor:g}" + (f" --num-actors {args.num_actors}" if args.num_actors else "")
        bundles = [{"GPU": gpus_per_actor, "CPU": cpus_per_actor}] * actors
        cluster = wait_for_gpus(ray, actors * gpus_per_actor, bundles, args.wait_for_gpus, what)
        gpus = float(cluster.get("GPU", 0))
    if gpus_per_actor > 0 and gpus == 0:
        raise JobError(
            f"--gpus-per-actor {gpus_per_actor:g}: the Ray cluster has no GPU; use --gpus-per-actor 0 to label on the CPU, "
            "or --wait-for-gpus SECONDS where the cluster adds GPU nodes on demand"
        )
    threads = max(1, int(cpus_per_actor))
    if gpus_per_actor > 0:
        num_actors = args.num_actors if args.num_actors is not None else max(1, int(gpus / gpus_per_actor + 1e-9))
    else:
        node_cpus = [float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
        num_actors, cpus_per_actor, threads = cpu_actor_sizing(node_cpus, args.num_actors, args.cpus_per_actor)
    cpus = float(cluster.get("CPU", 0))
    what_cpus = (
        f"--cpus-per-actor {cpus_per_actor:g}" if args.cpus_per_actor is not None else f"{cpus_per_actor:g} (the default --cpus-per-actor)"
    )
    needed_cpus = num_actors * cpus_per_actor + 1  # the actors, and one CPU to decode with

    def shortfalls(cpus: float, gpus: float) -> list[str]:
        short = []
        if cpus < needed_cpus - 1e-9:
            short.append(f"{num_actors} x {what_cpus} CPUs for the actors plus 1 CPU to decode, it has {cpus:g} CPUs")
        if num_actors * gpus_per_actor > gpus + 1e-9:
            short.append(f"{num_actors} x --gpus-per-actor {gpus_per_actor:g} GPUs, it has {gpus:g} GPUs")
        return short

    short = shortfalls(cpus, gpus)
    if short and ray_is_fixed(ray):
        # A private local Ray never grows: Ray Data would wait for the missing resources for ever.
        raise JobError(
            f"--num-actors {num_actors} cannot start on this private local Ray: the job needs {'; and '.join(short)}; "
            "lower --num-actors or --cpus-per-actor, or run on a larger cluster (--address, RAY_ADDRESS)"
        )
    if cpus < needed_cpus - 1e-9:
        # The actors would hold every CPU and decoding none: Ray Data would wait, silently, for
        # ever. A cluster that may grow is asked for the CPU, for a while.
        actor = {name: amount for name, amount in (("CPU", cpus_per_actor), ("GPU", gpus_per_actor)) if amount > 0}
        bundles = ([actor] * num_actors if actor else []) + [{"CPU": 1.0}]
        cluster = ask_autoscaler(
            ray, "CPU", needed_cpus, bundles, DECODE_CPU_WAIT_S,
            f"{num_actors} model actor(s) x {cpus_per_actor:g} CPU leave less than 1 of the Ray cluster's {cpus:g} CPUs to decode with: "
            f"asked its autoscaler for {needed_cpus:g} CPUs, waiting up to {DECODE_CPU_WAIT_S:g} s",
        )
        cpus = float(cluster.get("CPU", 0))
        if cpus < needed_cpus - 1e-9:
            short = shortfalls(cpus, float(cluster.get("GPU", 0)))
            raise JobError(
                f"--num-actors {num_actors} cannot start on this Ray cluster after {DECODE_CPU_WAIT_S:g} s of asking its autoscaler "
                f"for CPUs: the job needs {'; and '.join(short)}; lower --num-actors or --cpus-per-actor, or add CPU nodes"
            )
    return num_actors, gpus_per_actor, cpus_per_actor, threads


def threads_note(ray, gpus_per_actor: float, torch_threads: int) -> str:
    """ ", N torch threads" of the CPU actors, for the job's line (0: each its node's CPUs)."""
    if gpus_per_actor > 0:
        return ""
    if torch_threads:
        return f", {torch_threads} torch thread(s)"
    counts = sorted(
        {int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1}
    )
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}" if counts else "?"
    return f", {span} torch threads: its node's CPUs"
