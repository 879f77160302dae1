"""Experiment tracking (config section ``tracking``): MLflow, Weights & Biases and TensorBoard, one
tracked run per unit of work, grouped by the modecotd run.

- distill: each expert's (or baseline's) training, opened on its rank-0 worker: the step's loss and
  target tokens per second, then its summary and, for a LoRA, the adapter folder as an artifact;
- mix: each Ray Tune trial through Ray's own callbacks (:func:`tune_callbacks`);
- evaluate: one run at the end of the pipeline: every system's accuracies on every task (strict,
  the authors' lenient rule, likelihood, answer format) and the report's files as artifacts.

MLflow runs share the experiment ``modecotd-<run>`` and carry the tags ``modecotd.run`` and
``modecotd.stage``; W&B runs share the group ``<run>`` with the stage as job type.
"""
from __future__ import annotations

import logging
from pathlib import Path

from modecotd.errors import UserError

log = logging.getLogger(__name__)


def check_installed(settings: dict) -> None:
    """Refuse, before anything starts, a tracker whose library is not installed."""
    for key, module, extra in (("mlflow", "mlflow", "mlflow"), ("wandb", "wandb", "wandb")):
        if settings.get(key):
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"tracking.{key} needs {module}: pip install 'modecotd[{extra}]'") from None


def _wandb_dir(settings: dict) -> str:
    from modecotd.models import cache_dir

    folder = Path(settings["wandb"].get("dir") or cache_dir().parent / "wandb")
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its files: beside a local SQLite store's database (MLflow's own
    default, ./mlruns, depends on the working folder of whichever process creates it); a tracking
    server's own choice otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def mlflow_experiment(client, uri: str, run: str) -> str:
    """The id of the run's MLflow experiment, made if it is not there yet (by another process too)."""
    name = f"modecotd-{run}"
    if (experiment := client.get_experiment_by_name(name)) is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:  # made meanwhile by a worker of the same run
        if (experiment := client.get_experiment_by_name(name)) is not None:
            return experiment.experiment_id
        raise


def prepare(settings: dict, run: str) -> None:
    """Called by the driver before any stage: makes the run's MLflow experiment, and so a new
    SQLite store's tables, in one process (workers that make a new store's tables at the same time
    break each other's schema migration)."""
    if settings.get("mlflow"):
        _try(f"run {run}", "MLflow", lambda: mlflow_experiment(_mlflow_client(settings["mlflow"]), settings["mlflow"],
                                                              run))


def _try(who: str, what: str, action) -> None:
    """Tracking never stops the work: a tracker that fails is logged and dropped."""
    try:
        action()
    except Exception as error:
        log.warning("%s: %s tracking dropped: %s", who, what, error)


def _mlflow_client(uri: str):
    import os

    # a tracking server that does not answer is given up in seconds, not MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


class Tracker:
    """One tracked unit of work: ``with Tracker(settings, run, "distill", "coins", params) as t:
    t.log({...}, step)``. ``settings``: the config's ``tracking`` section as a dict (it travels to
    workers); ``tensorboard_dir``: where TensorBoard event files go, None for none. A tracker whose
    service fails is logged and dropped: the work never stops for its tracking."""

    def __init__(self, settings: dict, run: str, stage: str, name: str, params: dict | None = None,
                 tensorboard_dir: Path | None = None):
        self.settings, self.run, self.stage, self.name = settings, run, stage, name
        self.params = {k: v for k, v in (params or {}).items() if isinstance(v, (str, int, float, bool))}
        self.tensorboard_dir = tensorboard_dir if settings.get("tensorboard", True) else None
        self.mlflow = self.wandb = self.writer = None

    def __enter__(self) -> "Tracker":
        if self.settings.get("mlflow"):
            self._guard("MLflow", self._open_mlflow)
        if self.settings.get("wandb"):
            self._guard("W&B", self._open_wandb)
        if self.tensorboard_dir is not None:
            self._guard("TensorBoard", self._open_tensorboard)
        return self

    def _guard(self, what: str, action) -> None:
        _try(f"{self.stage} {self.name}", what, action)

    def _open_mlflow(self) -> None:
        client = _mlflow_client(self.settings["mlflow"])
        run = client.create_run(mlflow_experiment(client, self.settings["mlflow"], self.run),
                                run_name=f"{self.stage} {self.name}",
                                tags={"modecotd.run": self.run, "modecotd.stage": self.stage})
        for key, value in self.params.items():
            client.log_param(run.info.run_id, key, value)
        self.mlflow = (client, run.info.run_id)

    def _open_wandb(self) -> None:
        import wandb

        options = self.settings["wandb"]
        self.wandb = wandb.init(project=options["project"], entity=options.get("entity"), mode=options["mode"],
                                group=self.run, job_type=self.stage, name=f"{self.stage} {self.name}",
                                config=self.params, dir=_wandb_dir(self.settings), reinit="create_new")

    def _open_tensorboard(self) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(self.tensorboard_dir))

    def log(self, metrics: dict, step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.mlflow:
            client, run_id = self.mlflow
            self._guard("MLflow", lambda: [client.log_metric(run_id, key.replace("/", "."), value, step=step or 0)
                                           for key, value in numbers.items()])
        if self.wandb:
            self._guard("W&B", lambda: self.wandb.log(numbers, step=step, commit=True))
        if self.writer:
            self._guard("TensorBoard", lambda: [self.writer.add_scalar(key, value, step or 0)
                                                for key, value in numbers.items()])

    def artifacts(self, folder: Path, name: str) -> None:
        """Every file of ``folder`` as the artifact ``name`` (MLflow: a folder of the run's artifacts;
        W&B: an artifact of that name)."""
        if self.mlflow:
            client, run_id = self.mlflow
            self._guard("MLflow", lambda: client.log_artifacts(run_id, str(folder), name))
        if self.wandb:
            def upload():
                import wandb

                artifact = wandb.Artifact(f"{self.run}-{self.stage}-{self.name}-{name}".replace(" ", "-"), type=name)
                artifact.add_dir(str(folder))
                self.wandb.log_artifact(artifact)
            self._guard("W&B", upload)

    def __exit__(self, kind, error, trace) -> None:
        if self.mlflow:
            client, run_id = self.mlflow
            self._guard("MLflow", lambda: client.set_terminated(run_id, "FAILED" if kind else "FINISHED"))
        if self.wandb:
            self._guard("W&B", lambda: self.wandb.finish(exit_code=1 if kind else 0))
        if self.writer:
            self._guard("TensorBoard", self.writer.close)


READINGS = ("accuracy", "accuracy_strict", "accuracy_reference", "accuracy_likelihood", "format_rate", "n")


def track_results(settings: dict, run: str, storage) -> None:
    """The evaluation's numbers from the run's report.json (every system on every task) and the
    report's files, as one tracked run (stage evaluate)."""
    import json
    import tempfile

    from modecotd.units import ReportFiles

    if not (settings.get("mlflow") or settings.get("wandb")):
        return
    report = json.loads(storage.read_text(ReportFiles.JSON))
    with tempfile.TemporaryDirectory() as folder, Tracker(settings, run, "evaluate", "results") as tracker:
        for task, facts in report.get("tasks", {}).items():
            for system, evaluation in (facts.get("eval") or {}).items():
                tracker.log({f"{task}/{system}/{key}": evaluation.get(key) for key in READINGS
                             if isinstance(evaluation.get(key), (int, float))})
        for name in ReportFiles.ALL:
            if storage.exists(name):
                storage.download(name, Path(folder) / name)
        tracker.artifacts(Path(folder), "report")


def tune_callbacks(settings: dict, run: str) -> list:
    """Ray Tune's own MLflow and W&B callbacks for the mix stage's trials (TensorBoard files Tune
    writes by itself)."""
    callbacks = []
    if settings.get("mlflow"):
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=settings["mlflow"], experiment_name=f"modecotd-{run}",
                                              tags={"modecotd.run": run, "modecotd.stage": "mix"}))
    if settings.get("wandb"):
        options = settings["wandb"]
        callbacks.append(_wandb_callback()(project=options["project"], entity=options.get("entity"), group=run,
                                           job_type="mix", mode=options["mode"], dir=_wandb_dir(settings)))
    return callbacks


def _wandb_callback() -> type:
    """Ray's W&B callback, but one that asks for no API key in offline mode: Ray's reads the mode
    from the WANDB_MODE variable only, not from the mode it is given to pass on."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class WandbCallback(WandbLoggerCallback):
        def setup(self, *args, **kwargs):
            if self.kwargs.get("mode") != "offline":
                super().setup(*args, **kwargs)

    return WandbCallback
