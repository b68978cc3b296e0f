"""The skeleton of tfmm's training jobs (`tfmm.ctr`, `tfmm.pretrain`): what every run
does around its own work.

`run(job)` takes a `Job` through the same steps:

1. validate the settings (`SettingsError`, naming the flag);
2. build the distribution (`tfmm.distribute.distribution`), first: a
   multi-worker strategy must exist before TensorFlow runs anything;
3. refuse a directory that holds a run with other settings (`check_dir`);
4. ``job.check``: read and check the inputs; then the caller's ``before``
   steps (e.g. pre-training into an empty index, `tfmm.train.ranker`); then
   ``job.load``: open what those steps wrote. Nothing is written before
   here, so a refused run writes nothing;
5. the chief claims the directories (`claim_dir`: their ``config.json``);
6. ``job.train``: train, evaluate, export; the result, on the chief;
7. the chief writes ``<model_dir>/metrics.json``: the result, the ``before``
   steps' entries, ``train_seconds`` and ``config``; workers that are not the
   chief return None.

```python
class Job(jobs.Job):
    def check(self, dist):
        self.meta = read_data(self.config.data_dir)  # SettingsError: nothing written

    def train(self, dist):
        with dist.scope():
            model = build(self.config)
        dist.fit(model, batches, self.config.epochs, self.config.model_dir, record)
        return {"auc": ...} if dist.is_chief else None

result = jobs.run(Job(config))  # <model_dir>/metrics.json
```
"""

import dataclasses
import json
import os
import time

from tfmm import distribute, export
from tfmm.callbacks import write_json
from tfmm.config import SettingsError
from tfmm.index import local_index, redact


class Job:
    """A training job as `run` takes it through its steps; the jobs override them."""

    def __init__(self, config):
        self.config = config

    def directories(self):
        """(directory, settings, flag) of each directory the run writes and holds to its
        settings (`check_dir`): by default the ``model_dir``, to all of them."""
        return [(self.config.model_dir, settings(self.config), "model_dir")]

    def check(self, dist):
        """Reads and checks the inputs under `dist` (a `tfmm.distribute.Distribution`);
        raises SettingsError; writes nothing."""

    def load(self, dist):
        """Opens the inputs the ``before`` steps of `run` may have written; writes nothing."""

    def train(self, dist):
        """Trains, evaluates and exports; returns the metrics (None on a worker that is
        not the chief)."""
        raise NotImplementedError


def run(job, before=()):
    """Runs `job` (a `Job`) through the steps every job takes; returns its metrics dict
    (None on a worker that is not the chief: it writes nothing).

    Args:
        before: functions of the `tfmm.distribute.Distribution`, run after the
            job's checks and before it loads its inputs; each returns entries
            for metrics.json.
    """
    config = job.config.validate()
    try:  # first: a multi-worker strategy must exist before TensorFlow runs anything
        dist = distribute.distribution(
            config.strategy, getattr(config, "cluster_timeout", 300.0))  # ctr's setting
    except ValueError as e:
        raise SettingsError(f"--strategy={config.strategy}: {e}") from None
    start = time.time()
    dirs = job.directories()
    for directory, values, flag in dirs:
        check_dir(directory, values, flag)
    job.check(dist)
    entries = {}
    for step in before:
        entries.update(step(dist))
    job.load(dist)
    for directory, values, _ in dirs if dist.is_chief else ():  # the run can start
        claim_dir(directory, values)
    result = job.train(dist)
    if not dist.is_chief:
        return None
    result.update(entries, train_seconds=time.time() - start, config=config_json(job.config))
    write_json(os.path.join(job.config.model_dir, "metrics.json"), result)
    return result


def config_json(config):
    """Every setting, JSON-ready, with no index password (metrics.json, config.json)."""
    return json.loads(json.dumps(dict(dataclasses.asdict(config), index=redact(config.index))))


def settings(config, names=None):
    """The settings (of `names`, default all) a directory holds its runs to."""
    values = config_json(config)
    return {k: v for k, v in values.items() if k != "verbose" and (names is None or k in names)}


# What a job writes in its directory, and replaces or deletes there (the backup when
# the run ends, MAKE's epochs when it pre-trains afresh).
RUN_FILES = ("backup", "logs", "epochs.json", "metrics.json", "make")


def check_export_dir(config):
    """Refuses `config`'s ``export_dir`` where it is a base of user files or of the job's
    inputs (`tfmm.export.check_export_dir`), as a SettingsError, before anything runs."""
    if config.export_dir:
        try:
            export.check_export_dir(config.export_dir,
                                    (config.data_dir, local_index(config.index)))
        except ValueError as e:
            raise SettingsError(str(e)) from None


def check_dir(directory, values, flag):
    """Refuses a directory that holds a run with other settings `values`, or, without a
    run's ``config.json``, files of the names a run writes (`RUN_FILES`, weights):
    the user's, which the run would replace or delete. Writes nothing."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path) and os.path.isdir(directory):
        theirs = sorted(name for name in os.listdir(directory)
                        if name in RUN_FILES or name.endswith(".weights.h5"))
        if theirs:
            raise SettingsError(f"--{flag}={directory} holds {', '.join(theirs)} but no run of "
                                "tfmm (no config.json): a run would replace or delete them; "
                                f"use a fresh --{flag}.")
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        changed = sorted(k for k in set(values) | set(theirs) if values.get(k) != theirs.get(k))
        if changed:
            raise SettingsError(f"--{flag}={directory} holds a run with other settings "
                                f"({', '.join(changed)}); use a fresh --{flag}.")


def claim_dir(directory, values):
    """Records settings `values` in `directory`, which `check_dir` then holds to them."""
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "config.json"), values)
