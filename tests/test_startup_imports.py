"""What a trial's processes import before the first step (issue 8: trial start-up). Each check runs in
a fresh interpreter, because this test session has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _modules_after(code: str) -> dict[str, bool]:
    probe = code + "\nimport json, sys\nprint(json.dumps({m: m in sys.modules for m in ('mlflow', 'timm', 'spikingjelly', 'qksweep.api', 'torch')}))"
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_worker_loop_import_leaves_out_the_api_and_mlflow():
    got = _modules_after("import qksweep.trainables.loop")
    assert got["timm"] and not got["mlflow"] and not got["qksweep.api"], got


def test_trainer_is_built_without_importing_the_loop(tmp_path):
    code = f"""
from qksweep.config import Config
from qksweep.trainables.launcher import make_trainer
cfg = Config.model_validate({{"model": {{"name": "qkformer_cifar", "embed_dim": 32, "num_heads": 2, "depth": 2,
                                         "time_steps": 1, "patch_size": 4}},
                             "data": {{"name": "digits", "img_size": 16}},
                             "run": {{"storage": {str(tmp_path)!r}}}, "tracking": {{"enabled": False}}}})
t = make_trainer(cfg, run_name="t", run_id=None)
assert t.train_loop_per_worker.__module__ == "qksweep.trainables.entry", t.train_loop_per_worker
assert type(t).__name__ == "DataParallelTrainer", type(t)  # one CPU worker: no process group to set up
"""
    got = _modules_after(code)
    # nor torch: the trial driver and the Train controller that unpickles the backend skip its import
    assert not got["timm"] and not got["spikingjelly"] and not got["torch"], got


def test_several_workers_or_a_gpu_get_torchs_process_group():
    from qksweep.trainables.launcher import trainer_class

    for workers, gpus, backend in ((2, 0, "gloo"), (1, 1, "nccl"), (4, 0.5, "nccl")):
        cls, kw = trainer_class(workers, gpus)
        assert cls.__name__ == "TorchTrainer" and kw["torch_config"].backend == backend
    cls, kw = trainer_class(1, 0)
    assert cls.__name__ == "DataParallelTrainer" and kw == {}


def test_no_ray_data_callback_without_datasets(tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from qksweep.trainables.launcher import without_ray_data

    kw = dict(scaling_config=ray.train.ScalingConfig(num_workers=1),
              run_config=ray.train.RunConfig(name="t", storage_path=str(tmp_path)))
    trainer_cls = without_ray_data(TorchTrainer)
    assert trainer_cls.__name__ == "TorchTrainer"
    cbs = trainer_cls(lambda c: None, **kw)._create_default_callbacks()
    assert not any(isinstance(c, DatasetsCallback) for c in cbs)
    assert any(isinstance(c, DatasetsCallback) for c in TorchTrainer(lambda c: None, **kw)._create_default_callbacks())


def test_train_callbacks_unpickle_without_mlflow_or_the_trial_driver():
    """Ray pickles the run's callbacks into the Train context: the controller and every worker unpickle
    them at start-up, so their modules must not pull in MLflow or the trial driver's imports."""
    import pickle

    from qksweep.tracking.callback import MLflowEpochLogger
    from qksweep.trainables.report import PublicTuneReport

    blob = pickle.dumps([MLflowEpochLogger("sqlite:///x.db", "r1", metric="val/top1", mode="max", epochs=2),
                         PublicTuneReport.__new__(PublicTuneReport)])
    code = f"import pickle\ncbs = pickle.loads({blob!r})\nassert type(cbs[0]).__name__ == 'MLflowEpochLogger'"
    got = _modules_after(code + "\nimport sys\nassert 'qksweep.trainables.trial' not in sys.modules")
    assert not got["mlflow"] and not got["timm"], got
