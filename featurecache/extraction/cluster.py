"""Extraction on a Ray cluster (`--executor ray`): the forward passes spread over many machines, the
store still written by the driver alone.

    driver node                               any node                      driver
    read tasks: files -> bytes,   ------>     encoder actors (one Encoder   ------>  iter_batches ->
    arrays -> raw pixels                      each, built once): vectors            FeatureStore.append

The pending images become a Ray Dataset whose read tasks run on the driver's node (a datasource
without distributed reads, which Ray pins there), so workers need no shared disk: they receive file
contents or raw pixels, never a path or the cache folder. A pool of actors (`map_batches` with a callable class),
each holding one `Encoder` built from an `EncoderDescription`, turns batches into vectors; the
converted graph the driver made (ONNX, OpenVINO IR, int8 IR) is shipped to the actors once through
the object store, so no worker converts or calibrates anything. Ray Data's streaming executor
bounds what is in flight (backpressure), so the driver's memory does not grow with the images.

Faults are Ray's to absorb: actors restart and their batches are retried (`max_restarts`,
`max_task_retries`); a batch delivered twice is dropped by key here, so nothing is stored twice.
The driver appends vectors as they arrive, so a killed driver loses at most the part being filled
and the rerun computes only what is missing. The executor changes nothing in a key: a set made on
Ray is a cache hit locally and the other way round. The worker side (read tasks, the encoder actor,
the rows they exchange) is featurecache/extraction/cluster_worker.py.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .cluster_worker import EncodeActor, graph_files, make_carry, make_datasource, read_rows
from ..encoding.encoder import Encoded, Encoder, measure_rate
from ..errors import FeatureCacheError
from ..settings import RunSettings
INSTALL = 'pip install "featurecache[ray]"'
PROBE_SECONDS = 5.0  # how long an address may take to answer before we say it does not
READ_CHUNK = 256  # images per read task: one block; bounds the bytes a read holds at once


@dataclass(frozen=True)
class ClusterSettings:
    """Where `--executor ray` runs and how wide; none of these changes a vector or a key."""
    address: str | None = None  # None: $RAY_ADDRESS, else a local Ray for the run; auto; HOST:PORT; ray://HOST:PORT
    workers: int | None = None  # encoder actors; None: fill the cluster (its CPUs // threads_per_worker)
    threads_per_worker: int = 1  # CPUs each actor reserves, and the threads its engine runs

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise FeatureCacheError(f"--workers {self.workers}: must be at least 1")
        if self.threads_per_worker < 1:
            raise FeatureCacheError(f"--threads-per-worker {self.threads_per_worker}: must be at least 1")

    @property
    def target(self) -> str | None:
        """The cluster to join, as Ray finds it: the address given, else $RAY_ADDRESS; None: start one."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


def require_ray():
    """The `ray` module with Ray Data, or one line naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FeatureCacheError(f"--executor ray needs Ray, which is not installed; run `{INSTALL}`") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of an address we can probe; None for `auto` (Ray finds the cluster itself)."""
    if address == "auto":
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise FeatureCacheError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]") or "127.0.0.1", int(port)


def probe(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail in one line, within `timeout`, when nothing listens at `address` (ray.init would retry
    for a minute or more before saying so)."""
    where = _host_port(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as e:
        why = "no answer" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise FeatureCacheError(f"--ray-address {address}: nothing answers at {where[0]}:{where[1]} ({why}); "
                                "start the head with `ray start --head` there, or check the address") from None


def check(cluster: ClusterSettings) -> None:
    """Everything that can fail before any work: Ray installed, the address answering."""
    require_ray()
    if cluster.target:
        probe(cluster.target)


def _debug() -> bool:
    from ..cli.quiet import debug_requested

    return debug_requested()


def _quiet_ray(ray) -> None:
    """Our quiet-start rule: Ray's progress bars, execution banners and log lines stay off the
    terminal unless --verbose / FEATURECACHE_DEBUG=1; our own progress bar counts for the cluster."""
    if _debug():
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False


JOIN_ATTEMPTS = 3  # joining through ray:// (see `connected`)


@contextmanager
def connected(cluster: ClusterSettings, log=None):
    """Ray, initialised for this run: a local one started (and stopped afterwards) when no address is
    given, else the cluster at the address joined (and left). A Ray this process had already
    initialised (a notebook's, a test's) is used as it is and left running."""
    ray = require_ray()
    _quiet_ray(ray)
    if ray.is_initialized():
        yield ray
        return
    debug = _debug()
    common = dict(log_to_driver=debug, logging_level=logging.INFO if debug else logging.ERROR,
                  configure_logging=True)
    address = cluster.target
    if address:
        probe(address)
        if address.startswith("ray://"):
            _client_auth()
        for attempt in range(JOIN_ATTEMPTS):
            try:
                with warnings.catch_warnings():
                    if not debug:  # Ray Client warns (and then raises) on a connection that times out
                        warnings.simplefilter("ignore")
                    ray.init(address=address, **common)
                break
            except (ConnectionError, RuntimeError, ValueError) as e:
                # Ray Client's proxy starts a server per client; on a busy head it can miss its deadline
                # ("Initialization failure from server"), which a second try usually gets past.
                transient = isinstance(e, ConnectionError) and "Initialization failure" in str(e)
                if transient and attempt + 1 < JOIN_ATTEMPTS:
                    ray.shutdown()
                    if log:
                        log(f"notice: {address} could not start a client server in time; trying again")
                    time.sleep(2 * (attempt + 1))
                    continue
                why = " ".join(str(e).split())[:300] or type(e).__name__
                raise FeatureCacheError(f"--ray-address {address}: cannot join the Ray cluster ({why})") from None
    else:
        from ..engines import threads

        ray.init(num_cpus=threads(), include_dashboard=False, **common)
        if log and debug:
            log(f"notice: started a local Ray with {threads()} CPUs for this run")
    try:
        yield ray
    finally:
        ray.shutdown()  # stops a local Ray; leaves a joined cluster running


def _client_auth() -> None:
    """Ray Client sends the cluster's token (Ray's token authentication, on by default where
    ~/.ray/auth_token exists) only when token mode is on in this process, which joining through ray://
    does not switch on by itself: Ray's own check turns it on when a token is at hand."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


# ---- the driver's side ---------------------------------------------------------------------------------
def _chunks(src, positions: list[int], size: int) -> list[tuple[int, list[int], list[str]]]:
    """`positions` of extract.Sources cut into read tasks: (source number, indices in it, image ids)."""
    out = []
    for k in range(0, len(positions), size):
        by_source: dict[int, tuple[list[int], list[str]]] = {}
        for q in positions[k:k + size]:
            s, j = src.where[q]
            idx, keys = by_source.setdefault(s, ([], []))
            idx.append(j)
            keys.append(src.ids[q])
        out += [(s, idx, keys) for s, (idx, keys) in by_source.items()]
    return out


def _workers(ray, cluster: ClusterSettings) -> tuple[int, int]:
    """(CPUs of the cluster, actors to run): by default as many as its CPUs hold."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return cpus, cluster.workers or max(1, cpus // cluster.threads_per_worker)


def encode_batches(encoder: Encoder, src, positions: list[int], run: RunSettings) -> Iterator[Encoded]:
    """Encode the images at `positions` of `src` (extract.Sources) on Ray (`run.cluster`, in batches of
    `run.batch_size`); yields `Encoded` batches as they arrive, each image once. The driver's `encoder`
    is loaded (its graph converted) and shipped."""
    cluster, batch_size = run.cluster or ClusterSettings(), run.batch_size
    with connected(cluster, run.say) as ray:
        graph = graph_files(encoder)
        _, workers = _workers(ray, cluster)
        seen: set[str] = set()
        if _client(ray):
            yield from (_unique(rows, encoder.taps, seen) for rows in _from_client(ray, encoder, graph, src, positions,
                                                                                   batch_size, cluster, workers))
            return
        # Pixels go to the object store once per source (read tasks slice them); files travel as paths.
        stores = [None if getattr(s, "paths", None) is not None else ray.put(getattr(s, "array", s))
                  for s in src.sources]
        carries = [make_carry(src.sources[s], idx, keys, stores[s])
                   for s, idx, keys in _chunks(src, positions, READ_CHUNK)]
        # Reading is I/O: no CPU held; as many reads at once as actors, since zero-CPU tasks would otherwise
        # each get a worker process of their own (Ray warned of 18 on 2 cores, each paying Python's start).
        ds = ray.data.read_datasource(make_datasource(carries), num_cpus=0, concurrency=max(2, workers))
        ds = ds.map_batches(EncodeActor, batch_size=batch_size, batch_format="numpy", concurrency=workers,
                            num_cpus=cluster.threads_per_worker, zero_copy_batch=True,
                            fn_constructor_args=(encoder.description, ray.put(graph) if graph else None,
                                                 cluster.threads_per_worker))
        # Ray Data's actors restart without limit and retry the batches of a dead one (max_restarts=-1,
        # max_task_retries=-1 are its defaults; passing them again is deprecated). A batch that was
        # delivered before its actor died and then retried arrives twice: `_unique` drops the copy.
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                yield _unique(block, encoder.taps, seen)
        except Exception as e:  # a worker's FeatureCacheError stays one line; anything else says where
            raise _one_line(e) from None


def _client(ray) -> bool:
    """Whether this driver joined through Ray Client (ray://): it then runs outside the cluster."""
    import ray.util.client

    return ray.util.client.ray.is_connected()


def _from_client(ray, encoder: Encoder, graph, src, positions: list[int], batch_size: int,
                 cluster: ClusterSettings, workers: int) -> Iterator[dict]:
    """Ray Client (ray://): no read task can run on this machine, which is not part of the cluster, so
    the driver reads each batch itself and sends it to an actor, keeping at most two per actor in flight
    (memory bounded as with Ray Data). Actors restart, and a dead one's calls are retried, as there."""
    actor_class = ray.remote(num_cpus=cluster.threads_per_worker, max_restarts=-1, max_task_retries=-1)(EncodeActor)
    graph_ref = ray.put(graph) if graph else None
    actors = [actor_class.remote(encoder.description, graph_ref, cluster.threads_per_worker) for _ in range(workers)]
    todo = iter(_chunks(src, positions, batch_size))
    flying: dict = {}  # call -> the actor running it

    def send(actor) -> None:
        chunk = next(todo, None)
        if chunk is not None:
            s, idx, keys = chunk
            flying[actor.__call__.remote(read_rows(src.sources[s], idx, keys))] = actor

    try:
        for actor in actors * 2:
            send(actor)
        while flying:
            (ready,), _ = ray.wait(list(flying), num_returns=1)
            actor = flying.pop(ready)
            send(actor)
            yield ray.get(ready)
    except Exception as e:
        raise _one_line(e) from None
    finally:
        for actor in actors:
            ray.kill(actor)


def estimate(encoder: Encoder, src, positions: list[int], run: RunSettings, probe: int = 128) -> dict:
    """What `encode_batches` would take: one actor on the cluster encodes a warm-up batch, then up to
    `probe` images timed (shipping included); the rate scales by the actors the cluster's CPUs hold."""
    t0 = time.perf_counter()  # a local Ray's start counts: the run pays it too
    cluster, batch_size = run.cluster or ClusterSettings(), run.batch_size
    with connected(cluster, run.say) as ray:
        cpus, workers = _workers(ray, cluster)
        graph = graph_files(encoder)
        actor = ray.remote(num_cpus=cluster.threads_per_worker)(EncodeActor).remote(
            encoder.description, ray.put(graph) if graph else None, cluster.threads_per_worker)
        skipped = {}

        def encode(chunk: list[int]) -> None:
            for s, idx, keys in _chunks(src, chunk, len(chunk)):
                rows = ray.get(actor.__call__.remote(read_rows(src.sources[s], idx, keys)))
                skipped.update((src.sources[s].name(j), str(why)) for j, why in zip(idx, rows["reason"]) if why)

        batch = min(batch_size, len(positions))
        try:
            # the actor's start (model, engine) falls in the first batch: setup, not steady state
            setup, per_worker, timed = measure_rate(encode, positions, batch, probe, t0)
        except Exception as e:
            raise _one_line(e) from None
        finally:
            ray.kill(actor)
    rate = per_worker * workers
    return {"executor": "ray", "engine": encoder.engine, "cluster_cpus": cpus, "workers": workers,
            "threads_per_worker": cluster.threads_per_worker, "setup_seconds": round(setup, 2),
            "per_worker_images_per_second": round(per_worker, 1), "measured_images_per_second": round(rate, 1),
            "measured_images": timed, "expected_seconds": round(setup + len(positions) / rate, 1),
            "skipped": [{"name": n, "reason": r} for n, r in skipped.items()]}


def _unique(block: dict, taps, seen: set) -> Encoded:
    """A block of actor rows as `Encoded`, dropping keys already delivered (a retried batch)."""
    keys = [str(k) for k in block["key"]]
    fresh = [r for r, k in enumerate(keys) if k not in seen]
    seen.update(keys)
    ok = [r for r in fresh if not block["reason"][r]]
    skipped = {keys[r]: str(block["reason"][r]) for r in fresh if block["reason"][r]}
    return Encoded([keys[r] for r in ok], {tap: np.asarray(block[f"v{t}"][ok], np.float32)
                                           for t, tap in enumerate(taps)}, skipped)


def _one_line(error: BaseException) -> FeatureCacheError:
    """A failure on the cluster as our one line: a worker's FeatureCacheError (an unreadable image
    under --on-error fail) as it was raised; anything else with its last line."""
    e, seen = error, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FeatureCacheError):
            return FeatureCacheError(str(e).strip().splitlines()[0])
        e = e.__cause__ or e.__context__
    text = str(error).strip().splitlines()
    for line in text:  # a worker's error crosses processes as text inside Ray's own
        if "FeatureCacheError:" in line:
            return FeatureCacheError(line.split("FeatureCacheError:", 1)[1].strip())
    return FeatureCacheError(f"the Ray cluster failed: {(text or [type(error).__name__])[-1][:300]}; finished "
                             "images are stored, rerun the same command to continue")
