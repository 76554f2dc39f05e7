"""Where the data stages run their per-chunk and per-shard functions: `data.engine` local (this machine's
process pools, as before) or ray (Ray actors on a local instance or a cluster).

The Ray engine runs the very functions the local pools run (validate's `init_worker` / `check_chunk`,
tokenize's per-shard map): an actor's __init__ does what a pool's initializer does, and each item goes to actor
`index % workers`. Ray runs one caller's calls on an actor in the order they were made, so the lowest unfinished
item is always at the head of its actor's queue: a step that must run in item order (validate's dedup index)
can wait for its turn (`RayTurns`) without ever waiting on an item queued behind it. Results come back in item
order, so everything after them is what the local path does.

Workers of a cluster read and write the stage's paths themselves: the data, the output and cache folders must
be the same paths on every node (a shared volume), and every node needs this package installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import deque

from tunepath.errors import StageError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # a head that does not take a TCP connection in this long is not there
IN_FLIGHT = 2  # items queued per actor: one running, one waiting, so an actor never idles between items
CLIENT_ATTEMPTS = 3  # Ray Client connections a busy head aborted, tried again


def _ray():
    try:
        import ray
    except ImportError:
        raise StageError("data.engine is 'ray' but Ray is not installed: pip install -e '.[ray]', or set data.engine "
                         "to 'local'") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `ray://host[:port]` or `host[:port]` address; None for `auto` (Ray finds its own)."""
    if address == "auto":
        return None
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not port:
        return rest, 10001 if client else 6379  # Ray's default client and GCS ports
    if not port.isdigit() or not host:
        raise StageError(f"data.ray_address {address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at the address: Ray itself retries a missing head for minutes."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise StageError(f"data.ray_address {address!r}: nothing answers at {target[0]}:{target[1]} ({why}); start the Ray "
                         "head (infra/README.md) or set data.ray_address to null for a local Ray instance") from None


@contextlib.contextmanager
def ray_session(data):
    """Ray for one stage: the cluster at `data.ray_address`, or a local instance with `data.workers()` CPUs; shut
    down when the stage ends, failed or not, so no Ray process outlives it. A session the caller already opened
    (a test's, a flow's) is used as it is and left running."""
    address = data.ray_address
    if address is not None:
        _check_reachable(address)
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    from tunepath.offline import OFFLINE_ENV

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline and no telemetry, like every other tool here
    try:
        if address is None:
            ray.init(num_cpus=data.workers(), include_dashboard=False, logging_level="WARNING",
                     object_store_memory=_object_store_bytes(data))
        else:
            _connect(ray, address, {**OFFLINE_ENV, "RAY_USAGE_STATS_ENABLED": "0"})
    except StageError:
        raise
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        ray.shutdown()
        where = f"data.ray_address {address!r}" if address else "a local Ray instance"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageError(f"{where}: Ray did not start: {first}") from None
    try:
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        cpus = ray.cluster_resources().get("CPU", 0)
        log.info("data engine ray: %s, %d node(s), %g CPUs", address or "a local instance", nodes, cpus)
        yield ray
    finally:
        ray.shutdown()


def _connect(ray, address: str, env: dict) -> None:
    """Join the cluster; a cluster's workers do not inherit this process's environment, so they get `env` here.
    A Ray Client connection the head aborts while it starts this client's server (a busy head: its server process
    did not come up) is tried again, CLIENT_ATTEMPTS times in all."""
    import time

    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, logging_level="WARNING", runtime_env={"env_vars": env})
            return
        except ConnectionAbortedError as e:
            ray.shutdown()
            if attempt == CLIENT_ATTEMPTS:
                raise
            log.warning("data.ray_address %r: the head aborted the connection (%s); trying again (%d of %d)",
                        address, (str(e).strip().splitlines() or [""])[0], attempt + 1, CLIENT_ATTEMPTS)
            time.sleep(2 * attempt)


def actor_count(ray, data, local: int, most: int | None = None) -> int:
    """Actors for a stage, at most `most` (the items there are): `data.num_proc` when set; on a cluster
    (`data.ray_address`) otherwise every CPU the cluster has, not the driver's cores; on a local instance `local`
    (the machine's cores, within the memory rule)."""
    count = local if data.num_proc or data.ray_address is None else max(1, int(ray.cluster_resources().get("CPU", 1)))
    return min(count, most) if most else count


def _object_store_bytes(data) -> int:
    # what goes through it is small (a chunk's counts, a shard's file names): an eighth of the stage's budget
    return max(128 << 20, int(data.memory_gb * (1 << 30)) // 8)


class _Worker:
    """One Ray actor: `setup(*args)` once (a pool's initializer), then `work(item)` for each item it is given."""

    def __init__(self, setup, args) -> None:
        if setup is not None:
            setup(*args)

    def run(self, work, item):
        return work(item)


def start_actors(ray, workers: int, setup=None, args: tuple = ()) -> list:
    """`workers` actors (1 CPU each), each set up by `setup(*args)`."""
    actor = ray.remote(num_cpus=1, max_restarts=0)(_Worker)
    return [actor.remote(setup, args) for _ in range(max(1, workers))]


def run_ordered(ray, work, items, workers: int = 1, setup=None, args: tuple = (), actors: list | None = None):
    """Yield `work(item)` for each item, in item order, from `actors` (kept) or `workers` new ones set up by
    `setup(*args)` (stopped at the end).

    A failed item raises its own exception here (not Ray's wrapper), so the stage's one-line errors stay as they are.
    """
    owned = actors is None
    actors = start_actors(ray, workers, setup, args) if owned else actors
    pending: deque = deque()
    try:
        for index, item in enumerate(items):
            pending.append(actors[index % len(actors)].run.remote(work, item))
            if len(pending) >= IN_FLIGHT * len(actors):
                yield _get(ray, pending.popleft())
        while pending:
            yield _get(ray, pending.popleft())
    finally:
        if owned:  # stopped part-way or not, nothing of this run keeps a CPU
            for a in actors:
                ray.kill(a)
        else:
            for ref in pending:
                with contextlib.suppress(Exception):  # finished meanwhile, or its actor is gone
                    ray.cancel(ref)


def _get(ray, ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, Exception):
            raise cause from None
        raise


class _TurnKeeper:
    """The turn counter of a run's actors (an async actor: waiting calls do not block the one that passes the turn)."""

    def __init__(self) -> None:
        import asyncio

        self.turn, self.changed = 0, asyncio.Condition()

    async def wait(self, index: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.turn == index)

    async def done(self, index: int) -> None:
        async with self.changed:
            self.turn = max(self.turn, index + 1)
            self.changed.notify_all()


class RayTurns:
    """Item k's ordered step runs after item k-1's, across the actors of one run (the local pool's `_Turns`)."""

    def __init__(self, keeper) -> None:
        self.keeper = keeper

    @classmethod
    def start(cls, ray) -> "RayTurns":
        return cls(ray.remote(num_cpus=0)(_TurnKeeper).remote())

    def wait(self, index: int) -> None:
        import ray

        ray.get(self.keeper.wait.remote(index))

    def done(self, index: int) -> None:
        import ray

        ray.get(self.keeper.done.remote(index))


class LazyRay:
    """A `ray_session` opened on first `start()` and closed with this context: a stage whose work is all cached
    (tokenize's rerun) never starts Ray."""

    def __init__(self, data) -> None:
        self.data, self._ray, self._stack, self._actors = data, None, contextlib.ExitStack(), []

    def start(self):
        if self._ray is None:
            self._ray = self._stack.enter_context(ray_session(self.data))
        return self._ray

    def actors(self, workers: int, setup=None, args: tuple = (), most: int | None = None) -> list:
        """Actors kept for the session: `workers`, or the cluster's CPUs (`actor_count`), at most `most` (the
        items there are). Tokenize's splits reuse them, each actor loading the tokenizer and its libraries once
        rather than once a split."""
        ray = self.start()
        workers = actor_count(ray, self.data, workers, most)
        if len(self._actors) < workers:
            self._actors += start_actors(ray, workers - len(self._actors), setup, args)
        return self._actors[:workers]

    def __enter__(self) -> "LazyRay":
        return self

    def __exit__(self, *exc) -> None:
        self._ray, self._actors = None, []
        self._stack.close()  # ray.shutdown stops the actors
