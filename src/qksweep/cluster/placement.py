"""Placement groups a sweep's Train runs leave behind when the sweep ends abruptly.

When Tune stops trials at the end of a sweep (Ctrl-C, SIGTERM, an error), it kills each trial's driver
actor, and the Train controller that driver owns dies a moment later. A controller that sees its worker
die first treats it as a worker failure and, within ``FailureConfig(max_failures)``, reserves a new
worker group: a new placement group, created after Ray Train's ``PlacementGroupCleaner`` and, when the
driver has already exited, after Ray removed the job's placement groups. On a cluster that outlives the
driver (``RAY_ADDRESS``, ``qksweep submit``) that group then holds its CPUs for good, and every later
trial or job waits for them. Measured with a 2-CPU local head: after Ctrl-C of ``qksweep sweep`` one
1-CPU placement group of the finished job stayed CREATED, with no actor left, for as long as we watched.

So the sweep driver, before it lets go, waits (bounded) until no Train controller of its own job is
alive and removes the placement groups its job created during the sweep that are still there. Only
groups created while the sweep ran are touched: a notebook's own groups made before it are left alone.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("qksweep")


def job_placement_groups() -> set[str]:
    """Ids (hex) of this job's placement groups that are not removed. A placement group id ends with the
    id of the job that created it."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
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


def _controllers_alive(job: str) -> int | None:
    """How many Train controllers of ``job`` are not dead yet; None when the state API cannot say."""
    try:
        from ray.util.state import list_actors

        from .connect import state_api_address

        actors = list_actors(address=state_api_address(),
                             filters=[("job_id", "=", job), ("class_name", "=", "TrainController"),
                                      ("state", "!=", "DEAD")], raise_on_missing_output=False, timeout=10)
        return len(actors)
    except Exception:  # noqa: BLE001 - no dashboard: fall back to a fixed wait
        return None


def release_placement_groups(before: set[str], settle_s: float = 20.0) -> list[str]:
    """Remove the placement groups this job created since ``before`` was taken, once its Train
    controllers are gone (at most ``settle_s`` seconds of waiting). Returns the ids removed."""
    import ray

    if not ray.is_initialized():
        return []
    job = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + settle_s
    alive = _controllers_alive(job)
    if alive is None:
        time.sleep(min(3.0, settle_s))
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = _controllers_alive(job)
    removed = remove(job_placement_groups() - before)
    if removed:
        log.info("released %d placement group(s) left by stopped Train runs", len(removed))
    return removed
