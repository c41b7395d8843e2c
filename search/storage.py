"""Step checkpoints kept to what a search needs (`checkpoints_to_keep: front`), deleted as the front moves.

Every prune step saves a checkpoint: at AST-base size (about 350 MB) a 12-trial, 10-step search that keeps
them all writes about 42 GB to the cluster's storage. Tune's own `num_to_keep` keeps each trial's last few,
which loses the front's models that are no longer a trial's latest (the report logs, evaluates and exports
those). `CheckpointKeeper` keeps exactly:
- each unfinished trial's latest step, which a restart (or a resumed search) goes on from;
- every step on the search's current Pareto front, over its objectives;
- every step a population-based clone started from (its lineage). The scheduler sets a clone's config
  (`cloned_from`) before Tune's callbacks see the result that made it clone, so the source step is marked
  before its trial's next result could make it deletable, while the clone may still be loading it.
It deletes every other step checkpoint of the search once its result is in, in the Tune driver.
"""

from __future__ import annotations

from ray import tune

from search.pareto import dominates
from search.tracking import run_key

Key = tuple[str, int]  # (trial segment's run key, step): the report's (trial, step)


class CheckpointKeeper(tune.Callback):
    """A Tune callback deleting the step checkpoints no longer needed; `keys` are the front's objectives as
    result keys (search.space.objective_keys)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = tuple(keys)
        self.points: dict[Key, tuple[float, ...]] = {}  # every step's objective values
        self.front: set[Key] = set()
        self.latest: dict[str, Key] = {}  # trial id -> its latest result's step (a clone's may be lower than before)
        self.done: set[str] = set()  # trial ids finished: nothing resumes from their latest step
        self.sources: set[tuple[str, int]] = set()  # (trial id, step) a clone started from
        self.stored: dict[Key, tuple] = {}  # the checkpoints not deleted: (file system, path)
        self.deleted = 0

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        name, step = result.get("checkpoint_dir_name"), result.get("step")
        if step is None:
            return
        key = (run_key(trial.trial_id, int(result.get("segment") or 0)), int(step))
        if name:
            self.stored[key] = (trial.storage.storage_filesystem, f"{trial.storage.trial_fs_path}/{name}")
        self.latest[trial.trial_id] = key
        for lineage in [result, *(other.config for other in trials)]:  # the trainable's word, and the scheduler's
            if lineage.get("cloned_from"):
                source, at = str(lineage["cloned_from"]).rsplit("/", 1)
                self.sources.add((source, int(at)))
        if all(result.get(k) is not None for k in self.keys):
            self._place(key, tuple(float(result[k]) for k in self.keys))
        self._delete_unneeded()

    def _place(self, key: Key, point: tuple[float, ...]) -> None:
        """Update the front with one new point: it joins unless a front point dominates it, and drops those it dominates."""
        self.points[key] = point
        if any(dominates(self.points[other], point) for other in self.front):
            return
        self.front = {other for other in self.front if not dominates(point, self.points[other])} | {key}

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.done.add(trial.trial_id)
        self._delete_unneeded()

    def needed(self, key: Key) -> bool:
        trial = key[0].split(".", 1)[0]
        return (key in self.front or (trial not in self.done and self.latest.get(trial) == key)
                or (trial, key[1]) in self.sources)

    def _delete_unneeded(self) -> None:
        for key in [key for key in self.stored if not self.needed(key)]:
            filesystem, path = self.stored.pop(key)
            try:
                filesystem.delete_dir(path)
            except FileNotFoundError:
                pass
            self.deleted += 1
