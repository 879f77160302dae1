"""The `tracking` section: MLflow (a local SQLite store: MLflow's plain-folder store is deprecated),
W&B (offline mode) and TensorBoard, each read back."""
from __future__ import annotations

import json

import pytest

from modecotd.tracking import Tracker, check_installed, track_results


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
        # W&B offline keeps its records in a binary file only its service reads: read them from the run
        assert tracker.wandb.summary["loss"] == 1.2 and tracker.wandb.summary["target_tokens_per_s"] == 300.0
        assert (tracker.wandb.group, tracker.wandb.job_type, tracker.wandb.name) == ("e2e", "distill", "distill coins")
        assert dict(tracker.wandb.config) == {"lora_r": 4}

    client, [run] = mlflow_runs(tmp_path, "e2e")
    assert run.info.run_name == "distill coins" and run.info.status == "FINISHED"
    assert run.data.tags["modecotd.run"] == "e2e" and run.data.tags["modecotd.stage"] == "distill"
    assert run.data.params == {"lora_r": "4"}  # only plain values
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/adapter_config.json"]

    [offline] = (tmp_path / "wandb" / "wandb").glob("offline-run-*")  # for `wandb sync` later
    assert next(offline.glob("run-*.wandb")).stat().st_size > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


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
