"""Placement groups that Ray Train runs leave behind, while a sweep runs and when it ends.

Why they are left (DEVELOPERS.md, "Placement groups that outlive their trial", has the evidence): a
Train V2 controller reserves its worker group as a placement group and registers that group with its
``PlacementGroupCleaner`` only *after* the workers started (``after_worker_group_start``). A controller
that dies in between (its trial stopped by ASHA, Tune or Ctrl-C while it waits for the group, or while
it reserves a new group after seeing its worker die) leaves a group that no cleaner knows. Ray removes
a non-detached group only when both its creator actor and its job are dead, and the job is the sweep
driver: the group holds its CPUs for the rest of the sweep, and two of them on a 2-CPU machine
deadlock it.

So the sweep driver watches (:class:`PlacementGroupWatch`, a Tune callback): every few seconds it
removes every group of its own job whose creator actor is dead (such a group can serve nobody: the
workers in it were owned by that actor), and if no trial has made progress for a while as trials wait
for resources, it says which trials wait for what and which groups hold the cluster. At the end of the
sweep :func:`release_placement_groups` waits for the job's controllers and removes what they left, and
before a sweep starts or resumes :func:`reclaim_finished_jobs` frees what drivers that are gone left.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

log = logging.getLogger("qksweep")

NIL_ACTOR = "ff" * 16


@dataclass(frozen=True)
class Group:
    """One placement group as the GCS records it."""

    id: str
    state: str  # PENDING, PREPARED, CREATED, RESCHEDULING, REMOVED
    job: str
    creator: str | None  # the actor that created it (hex); None for a driver
    creator_dead: bool
    bundles: tuple[dict[str, float], ...] = field(default=())

    def resources(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def groups() -> list[Group]:
    """Every placement group of the cluster, with its creator (the GCS's own table: Ray's public
    ``placement_group_table`` leaves out who created a group and whether it is alive)."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData as T

    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        d = T.FromString(raw)
        creator = d.creator_actor_id.hex()
        out.append(Group(id=d.placement_group_id.hex(), state=T.PlacementGroupState.Name(d.state),
                         job=d.creator_job_id.hex(), creator=None if creator in ("", NIL_ACTOR) else creator,
                         creator_dead=d.creator_actor_dead,
                         bundles=tuple(dict(b.unit_resources) for b in d.bundles)))
    return out


def current_job() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


def job_placement_groups() -> set[str]:
    """Ids (hex) of this job's placement groups that are not removed. A placement group id ends with the
    id of the job that created it."""
    from ray.util import placement_group_table

    job = current_job()
    return {pg_id for pg_id, pg in placement_group_table().items()
            if pg_id.endswith(job) and pg.get("state") != "REMOVED"}


def remove(pg_ids) -> list[str]:
    """Remove these placement groups (hex ids); returns those Ray took. Their actors die with them."""
    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    removed = []
    for pg_id in sorted(pg_ids):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(pg_id)
        except Exception as e:  # noqa: BLE001 - already gone or the cluster is going away: nothing to free
            log.debug("placement group %s: %s", pg_id, e)
    return removed


def actor_dead(actor_id: str) -> bool:
    """Whether the GCS's actor table has this actor DEAD (or no longer has it at all)."""
    from ray._private.state import state

    info = state.actor_table(actor_id)
    return not info or info.get("State") == "DEAD"


def orphans(job: str) -> list[Group]:
    """This job's placement groups whose creator actor is dead.

    The group's own ``creator_actor_dead`` flag is not enough: in the main job's hang both leaked
    groups still read ``creator_actor_dead: false`` while their TrainControllers were DEAD in the actor
    table (one destroyed with the Tune trial's placement group that had captured it, one after its
    owner, the trial driver, died). So the creator's state comes from the actor table too."""
    out = []
    for g in groups():
        if g.job != job or g.creator is None or g.state == "REMOVED":
            continue
        if g.creator_dead or actor_dead(g.creator):
            out.append(replace(g, creator_dead=True))
    return out


TRAIN_ACTORS = ("TrainController", "RayTrainWorker")


def train_actors(job: str | None = None) -> dict[str, str]:
    """Ray Train's controllers and workers that are not dead (actor id -> job id), of ``job`` or of every
    job, from the GCS's own actor table (no dashboard needed)."""
    from ray._private.state import state

    return {a: info["JobID"] for a, info in state.actor_table(None).items()
            if info.get("ActorClassName") in TRAIN_ACTORS and info.get("State") != "DEAD"
            and (job is None or info.get("JobID") == job)}


def alive_train_actors(job: str) -> frozenset[str] | None:
    """The ids of ``job``'s Train actors not dead yet; None where the GCS table cannot be read (Ray Client)."""
    try:
        return frozenset(train_actors(job))
    except Exception as e:  # noqa: BLE001 - the callers then fall back to a fixed wait
        log.debug("actor table: %s", e)
        return None


def kill(actor_ids) -> list[str]:
    """Kill these actors (hex ids) for good; returns those the GCS took. ``ray.kill`` wants a handle,
    which an actor made by another process (a driver that is gone) does not give; the GCS's own
    ``KillActorViaGcs`` (what a handle's kill ends in) takes the id."""
    import ray
    from ray._private.gcs_utils import create_gcs_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    actor_ids = sorted(actor_ids)
    if not actor_ids:
        return []
    stub = gcs_service_pb2_grpc.ActorInfoGcsServiceStub(create_gcs_channel(ray.get_runtime_context().gcs_address))
    killed = []
    for actor_id in actor_ids:
        try:
            reply = stub.KillActorViaGcs(gcs_service_pb2.KillActorViaGcsRequest(
                actor_id=bytes.fromhex(actor_id), force_kill=True, no_restart=True), timeout=10)
            if reply.status.code == 0:
                killed.append(actor_id)
            else:
                log.debug("actor %s: %s", actor_id, reply.status.message)
        except Exception as e:  # noqa: BLE001 - it died meanwhile, or the GCS is going away: nothing to free
            log.debug("actor %s: %s", actor_id, e)
    return killed


def finished_jobs() -> set[str]:
    """Ids (hex) of the jobs whose driver has exited."""
    from ray._private.state import state

    return {j["JobID"] for j in state.job_table() if j.get("IsDead")}


def reclaim_finished_jobs() -> tuple[list[str], list[str]]:
    """Free what the Train runs of drivers that are gone still hold: a sweep driver SIGKILLed on a
    cluster that lives on (and, in the test suite, on the session's Ray) should take its Train
    controllers and workers with it, as Ray ties an actor to its owner and a group to its job, but one
    controller was seen alive minutes after its driver and trial were dead, holding a worker group's CPU
    (CI of 2026-12-02). A Train actor of a finished job can serve nobody: it is killed, then the job's
    groups that are not removed yet. Returns (actors killed, groups removed). Best effort: where the GCS
    tables cannot be read (Ray Client), nothing is freed and the sweep goes on."""
    try:
        finished = finished_jobs()
        if not finished:
            return [], []
        killed = kill(a for a, job in train_actors().items() if job in finished)
        removed = remove(g.id for g in groups() if g.job in finished and g.state != "REMOVED")
    except Exception as e:  # noqa: BLE001 - a sweep must not fail for what it could not tidy
        log.warning("could not look for what stopped drivers left on the cluster: %s",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return [], []
    if killed or removed:
        log.warning("freed what stopped drivers left on the cluster: %d Ray Train actor(s), %d placement group(s)",
                    len(killed), len(removed))
    return killed, removed


def release_placement_groups(before: set[str], settle_s: float = 20.0,
                             actors_before: frozenset[str] = frozenset()) -> list[str]:
    """At the end of a sweep: wait for the Train controllers this job started since ``actors_before`` to end
    (at most ``settle_s`` seconds), kill those still alive (every trial is over: they can only reserve
    a worker group nobody will use), then remove the placement groups this job created since
    ``before`` was taken. Returns the group ids removed."""
    import ray

    if not ray.is_initialized():
        return []
    job = current_job()
    deadline = time.monotonic() + settle_s
    alive = alive_train_actors(job)
    if alive is None:
        time.sleep(min(3.0, settle_s))
    while alive and alive - actors_before and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = alive_train_actors(job)
    if alive and (left := alive - actors_before) and kill(left):
        log.warning("killed %d Ray Train actor(s) still alive after their trials ended", len(left))
    removed = remove(job_placement_groups() - before)
    if removed:
        log.info("released %d placement group(s) left by stopped Train runs", len(removed))
    return removed


def describe(resources: dict[str, float]) -> str:
    """``CPU 1, GPU 0.5``: the resources a person reads (not memory, object store or Ray's per-group names)."""
    shown = {k: v for k, v in resources.items() if "_group_" not in k and not k.startswith(
        ("memory", "object_store_memory", "node:", "accelerator_type"))}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"


def _actor_classes() -> dict[str, tuple[str, str]]:
    """actor id -> (class name, state), best effort (the state API serves it through the dashboard)."""
    try:
        from ray.util.state import list_actors

        from .connect import state_api_address

        return {a.actor_id: (a.class_name, a.state) for a in
                list_actors(address=state_api_address(), limit=10_000, raise_on_missing_output=False, timeout=10)}
    except Exception:  # noqa: BLE001 - the classes only name the holders; ids are shown without them
        return {}


def stall_report(running_trials: list[str], idle_s: float, job: str) -> str | None:
    """One line on why trials wait: the groups they wait for and the groups holding the cluster; None
    when none of this sweep's groups is waiting (the trials are just slow)."""
    import ray

    all_groups = [g for g in groups() if g.state != "REMOVED"]
    pending = [g for g in all_groups if g.job == job and g.state in ("PENDING", "RESCHEDULING")]
    if not pending:
        return None
    total = dict(ray.cluster_resources())
    free = dict(ray.available_resources())
    classes = _actor_classes()

    def holder(g: Group) -> str:
        mine = "this sweep" if g.job == job else f"job {g.job}"
        if g.creator is None:
            return f"{g.id[:8]} ({describe(g.resources())}; {mine}; made by its driver)"
        who = classes.get(g.creator) or ("an actor", "DEAD" if g.creator_dead or actor_dead(g.creator) else "ALIVE")
        return f"{g.id[:8]} ({describe(g.resources())}; {mine}; made by {who[0]}, {who[1].lower()})"

    holding = [g for g in all_groups if g.state == "CREATED" and any(
        k in ("CPU", "GPU") for k in g.resources())]
    need = {}
    for g in pending:
        for k, v in g.resources().items():
            need[k] = max(need.get(k, 0.0), v)
    fits = all(total.get(k, 0.0) >= v for k, v in need.items())
    what = "" if fits else " more than the whole cluster has: they can never start"
    running = ", ".join(running_trials) or "none"
    return (f"sweep waiting: no trial has made progress for {idle_s:.0f} s; running trial(s) {running}; "
            f"{len(pending)} worker group(s) of this sweep wait for {describe(need)} each{what}; cluster {describe(total)}, "
            f"free {describe({k: free.get(k, 0.0) for k in total})}; held by: "
            f"{'; '.join(holder(g) for g in holding) or 'no placement group (plain tasks or actors)'}")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def make_watch(**kwargs):
    """A :class:`PlacementGroupWatch` (built here so that importing this module does not import Tune)."""
    from ray.tune import Callback

    class PlacementGroupWatch(Callback):
        """Tune callback in the sweep driver: removes this job's orphaned placement groups as soon as they
        appear (checked every ``every_s``; a group goes once it has been orphaned for ``grace_s``, so that
        Ray Train's own cleaner, which polls every second, frees the groups it knows itself), and when no
        trial has reported, started or ended for ``stall_s`` while this sweep's groups wait, prints one
        line naming who waits and who holds (again every ``repeat_s`` while it lasts). It looks at
        placement groups only, so it holds for trials of any number of workers."""

        def __init__(self, every_s: float | None = None, stall_s: float | None = None,
                     repeat_s: float | None = None, grace_s: float = 3.0):
            self.every_s = every_s if every_s is not None else _env_float("QKSWEEP_PG_WATCH_S", 2.0)
            self.grace_s = grace_s
            self._orphaned_since: dict[str, float] = {}
            self.stall_s = stall_s if stall_s is not None else _env_float("QKSWEEP_STALL_S", 180.0)
            self.repeat_s = repeat_s if repeat_s is not None else _env_float("QKSWEEP_STALL_REPEAT_S", 600.0)
            self.reaped: list[Group] = []
            self.reports: list[str] = []
            self._job = None
            self._next_check = 0.0
            self._last_progress = time.monotonic()
            self._next_report = 0.0
            self._failing = False

        def setup(self, *args, **kwargs):
            """Each fit (a resumed sweep unpickles this callback from the sweep's first process)."""
            self._job, self._orphaned_since, self._next_check, self._next_report = None, {}, 0.0, 0.0
            self._last_progress = time.monotonic()

        def _progress(self, *args, **kwargs):
            self._last_progress = time.monotonic()
            self._next_report = 0.0

        on_trial_start = on_trial_result = on_trial_complete = on_trial_error = _progress

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now < self._next_check:
                return
            self._next_check = now + (self.every_s if not self._failing else max(self.every_s, 30.0))
            try:
                self._job = self._job or current_job()
                self._reap(now)
                idle = now - self._last_progress
                if idle >= self.stall_s and now >= self._next_report:
                    waiting = [t.trial_id for t in trials if t.status == "RUNNING"]
                    line = stall_report(waiting, idle, self._job)
                    if line:
                        self.reports.append(line)
                        print(line, flush=True)
                        self._next_report = now + self.repeat_s
                self._failing = False
            except Exception as e:  # noqa: BLE001 - GCS away for a moment, or no GCS table (Ray Client): retry slowly
                if not self._failing:
                    log.warning("placement-group watch: %s; retrying every 30 s", str(e).splitlines()[0] if str(e)
                                else type(e).__name__)
                self._failing = True

        def _reap(self, now: float) -> None:
            found = {g.id: g for g in orphans(self._job)}
            self._orphaned_since = {i: self._orphaned_since.get(i, now) for i in found}
            due = [i for i, t in self._orphaned_since.items() if now - t >= self.grace_s]
            for pg_id in remove(due):
                g = found[pg_id]
                self.reaped.append(g)
                self._orphaned_since.pop(pg_id, None)
                print(f"released placement group {g.id[:8]} ({describe(g.resources())}): the Train controller that "
                      f"made it is dead and had not handed it to Ray Train's cleaner", flush=True)

    return PlacementGroupWatch(**kwargs)
