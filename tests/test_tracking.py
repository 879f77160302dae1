"""The `tracking` section: MLflow (a local SQLite store: MLflow's plain-folder store is deprecated),
W&B (offline mode) and TensorBoard, each read back."""
from __future__ import annotations

import json

import pytest

from modecotd.tracking import Tracker, check_installed, prepare, track_results

import wandb_records


def settings(tmp_path) -> dict:
    return {"mlflow": f"sqlite:///{tmp_path}/mlflow.db", "tensorboard": True,
            "wandb": {"project": "p", "mode": "offline", "entity": None, "dir": str(tmp_path / "wandb")}}


def mlflow_runs(tmp_path, run: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(f"modecotd-{run}")
    return client, client.search_runs([experiment.experiment_id])


def test_a_tracked_unit_logs_its_steps_params_and_files_to_every_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    files = tmp_path / "adapter"
    files.mkdir()
    (files / "adapter_config.json").write_text("{}")
    with Tracker(settings(tmp_path), "e2e", "distill", "coins", params={"lora_r": 4, "rows": [1, 2]},
                 tensorboard_dir=tmp_path / "tb") as tracker:
        for step, loss in enumerate([2.0, 1.5, 1.2], 1):
            tracker.log({"loss": loss, "target_tokens_per_s": 100.0 * step}, step)
        tracker.artifacts(files, "adapter")
    client, [run] = mlflow_runs(tmp_path, "e2e")
    assert run.info.run_name == "distill coins" and run.info.status == "FINISHED"
    assert run.data.tags["modecotd.run"] == "e2e" and run.data.tags["modecotd.stage"] == "distill"
    assert run.data.params == {"lora_r": "4"}  # only plain values
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/adapter_config.json"]

    [offline] = (tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")  # for `wandb sync` later
    assert [(s["step"], s["loss"], s["target_tokens_per_s"]) for s in wandb_records.history(offline)] == [
        (1, 2.0, 100.0), (2, 1.5, 200.0), (3, 1.2, 300.0)]
    assert wandb_records.run_facts(offline) == {"group": "e2e", "job_type": "distill", "name": "distill coins",
                                                "config": {"lora_r": 4}}
    assert wandb_records.artifacts(offline) == ["e2e-distill-coins-adapter"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def log_one_training(uri: str, name: str) -> None:
    with Tracker({"mlflow": uri, "tensorboard": False}, "e2e", "distill", name) as tracker:
        tracker.log({"loss": 1.0}, 1)


def test_trainings_that_start_together_all_reach_a_new_mlflow_store(tmp_path):
    """Workers opening a new SQLite store at once broke each other's schema migration (one expert's
    tracking was dropped): the driver makes the store and the experiment before the stages start."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare({"mlflow": uri}, "e2e")
    processes = [multiprocessing.get_context("spawn").Process(target=log_one_training, args=(uri, f"t{i}"))
                 for i in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    client, runs = mlflow_runs(tmp_path, "e2e")
    assert sorted(run.info.run_name for run in runs) == ["distill t0", "distill t1", "distill t2"]
    assert all(run.data.metrics == {"loss": 1.0} for run in runs)


def test_the_evaluation_is_tracked_from_the_report_with_its_files(tmp_path):
    from modecotd.storage import Storage

    run = Storage(tmp_path / "run")
    report = {"tasks": {"coins": {"eval": {"base": {"accuracy": 0.5, "accuracy_strict": 0.5, "n": 6},
                                           "expert": {"accuracy": 1.0, "accuracy_strict": 1.0, "n": 6}}}}}
    run.write_text("report.json", json.dumps(report))
    run.write_text("report.md", "# report")
    track_results({"mlflow": f"sqlite:///{tmp_path}/mlflow.db", "tensorboard": True}, "e2e", run)
    client, [tracked] = mlflow_runs(tmp_path, "e2e")
    assert tracked.info.run_name == "evaluate results"
    assert tracked.data.metrics["coins.expert.accuracy"] == 1.0 and tracked.data.metrics["coins.base.n"] == 6
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "report")} == {"report/report.json",
                                                                                       "report/report.md"}


def test_a_tracker_that_fails_is_dropped_and_the_work_goes_on(tmp_path, caplog):
    broken = {"mlflow": "http://127.0.0.1:9/", "tensorboard": False}  # nothing listens there
    with Tracker(broken, "e2e", "distill", "coins") as tracker:
        tracker.log({"loss": 1.0}, 1)
    assert "MLflow tracking dropped" in caplog.text


def test_a_tracker_without_its_library_is_refused_before_the_run(monkeypatch):
    import builtins

    from modecotd.errors import UserError

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "wandb"
                        else real(name, *a, **k))
    with pytest.raises(UserError, match=r"tracking.wandb needs wandb: pip install 'modecotd\[wandb\]'"):
        check_installed({"wandb": {"project": "p"}})


def test_tune_trials_go_to_rays_own_mlflow_and_wandb_callbacks(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    from modecotd.tracking import tune_callbacks

    assert tune_callbacks({"mlflow": None, "wandb": None, "tensorboard": True}, "e2e") == []
    mlflow, wandb = tune_callbacks(settings(tmp_path), "e2e")
    assert isinstance(mlflow, MLflowLoggerCallback) and mlflow.experiment_name == "modecotd-e2e"
    assert mlflow.tags == {"modecotd.run": "e2e", "modecotd.stage": "mix"}
    assert isinstance(wandb, WandbLoggerCallback) and (wandb.project, wandb.group) == ("p", "e2e")
    assert wandb.kwargs["mode"] == "offline" and wandb.kwargs["job_type"] == "mix"


def test_tune_trials_are_logged_by_rays_callbacks_and_read_back(ray_cluster, tmp_path, monkeypatch):
    """A real Tune experiment with the mix stage's callbacks, offline W&B without an API key."""
    from ray import tune

    from modecotd.tracking import tune_callbacks

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")

    def trial(config):
        for fold in range(3):
            tune.report({"cv_loss": config["l1"] + fold})

    tuner = tune.Tuner(trial, param_space={"l1": tune.grid_search([0.5, 2.0])},
                       run_config=tune.RunConfig(name="mix-test", storage_path=str(tmp_path / "ray"),
                                                 callbacks=tune_callbacks(settings(tmp_path), "e2e")))
    assert not tuner.fit().errors

    client, runs = mlflow_runs(tmp_path, "e2e")
    assert len(runs) == 2 and {run.data.tags["modecotd.stage"] for run in runs} == {"mix"}
    losses = sorted([m.value for m in client.get_metric_history(run.info.run_id, "cv_loss")] for run in runs)
    assert losses == [[0.5, 1.5, 2.5], [2.0, 3.0, 4.0]]

    files = sorted((tmp_path / "wandb").rglob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    logged = sorted([step["cv_loss"] for step in wandb_records.history(file)] for file in files)
    assert logged == [[0.5, 1.5, 2.5], [2.0, 3.0, 4.0]]
    assert {(facts["group"], facts["job_type"]) for facts in map(wandb_records.run_facts, files)} == {("e2e", "mix")}
