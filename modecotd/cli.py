"""The `modecotd` command: run the pipeline (or some of its stages), search the mixer, rebuild a
report, compare two runs, export a system, write out an example config, check a config, manage a
local cluster."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from pathlib import Path

from modecotd.cluster.jobs import DEFAULT_ADDRESS
from modecotd.config import STAGES
from modecotd.errors import UserError
from modecotd.units import ReportFiles

log = logging.getLogger("modecotd")
TUNE_GRID = {"method": "lorahub,delta", "budget": "20,40", "bound": "1.5,3", "l1": "0.01,0.05", "top_k": "1,all"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modecotd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"modecotd {_version()}",
                        help="print modecotd's version and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_tune, _add_submit, _add_job_commands, _add_run_readers, _add_export, _add_examples,
                _add_check, _add_cluster):
        add(commands)
    for name in ("run", "tune", "submit", "status", "logs", "stop", "list"):
        commands.choices[name].add_argument(
            "--allow-http-token", action="store_true",
            help="send Ray's auth token in clear text (plain http://, or gRPC without Ray's TLS) to a host other "
                 "than this machine (refused otherwise)")
    for command in commands.choices.values():  # what several verbs share is said once
        for action in command._actions:
            if action.help is None and action.dest in SHARED_HELP:
                action.help = SHARED_HELP[action.dest]
    return parser


def add_run_args(command: argparse.ArgumentParser, address_help: str | None = None, storage_help: str | None = None,
                 run_dir_help: str | None = None) -> None:
    """The arguments of the verbs that drive a run on a cluster (run, tune): the config, the cluster,
    where the run lives, overrides, taking over its lease."""
    command.add_argument("config")
    command.add_argument("--address", help=address_help)
    command.add_argument("--storage", help=storage_help)
    command.add_argument("--run-dir", help=run_dir_help)
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="run the four stages (teacher, distill, mix, evaluate) on Ray")
    add_run_args(run, address_help="an existing Ray cluster (default: start a local one)",
                 storage_help="where runs live (config key storage; default runs): a folder, a mount every node "
                              "shares, or s3://bucket/prefix; the run goes to <storage>/<name>")
    run.add_argument("--stage", dest="stages", action="append", choices=STAGES, metavar="STAGE",
                     help=f"run only this stage ({', '.join(STAGES)}; repeatable) on the artifacts the earlier "
                          "stages left in the run folder")
    run.add_argument("--take-over", action="store_true",
                     help="take the run's lease from another driver that holds it (one known to be dead on another "
                          "machine; a lapsed lease, or one of a dead process on this machine, is taken anyway)")


def _add_tune(commands) -> None:
    tune = commands.add_parser("tune", help="run only the mixer search (the mix stage) on a run's experts")
    add_run_args(tune)
    tune.add_argument("--take-over", action="store_true", help="as for run")
    for key, example in TUNE_GRID.items():
        tune.add_argument(f"--{key.replace('_', '-')}", metavar="V[,V...]",
                          help=f"mixture.{key}: one value or a comma list to search, e.g. {example}")
    tune.add_argument("--optimizer", help="mixture.optimizer (ngopt, tpe, cmaes, random, gradient)")
    tune.add_argument("--scheduler", help="mixture.scheduler (none, asha, median)")


def _add_submit(commands) -> None:
    submit = commands.add_parser("submit", help="submit a run to a Ray cluster through the Ray Jobs API")
    add_run_args(submit, address_help=f"the cluster's dashboard (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})",
                 storage_help="where runs live, seen from the cluster: s3://bucket/prefix, or a folder every node "
                              "mounts (config key storage)",
                 run_dir_help="the run folder on the cluster's head node (default: ~/modecotd-runs/<run name>)")
    submit.add_argument("--stage", dest="stages", action="append", choices=STAGES, metavar="STAGE")
    submit.add_argument("--pip", action="append", metavar="REQUIREMENT",
                        help="a pip requirement the job's environment needs (repeatable)")
    submit.add_argument("--working-dir", type=Path, help="send this folder as the job's working directory "
                                                         "(default: only the config and the data files it names)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="with --working-dir: leave out what this .gitignore-style pattern matches (repeatable)")
    submit.add_argument("--wait", action="store_true", help="follow the job's log until it ends")
    submit.add_argument("--submission-id", help="the job's id (default: a new one); submitting again with the same "
                                                "id and config does nothing (a safe retry), with another config "
                                                "is refused")


def _add_job_commands(commands) -> None:
    """The verbs on a submitted run: status, logs, stop; and list."""
    for name, text in (("status", "a submitted run's state"), ("logs", "a submitted run's log"),
                       ("stop", "stop a submitted run")):
        command = commands.add_parser(name, help=text)
        command.add_argument("submission_id")
        command.add_argument("--address")
        if name == "logs":
            command.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    listing = commands.add_parser("list", help="modecotd runs submitted to a cluster, newest first")
    listing.add_argument("--address")


def _add_run_readers(commands) -> None:
    """The verbs that read a finished run: report, compare, pull."""
    report = commands.add_parser("report", help="rebuild report.md, report.json and the plots of a run")
    report.add_argument("run", help="the run's folder or URI; with --storage, its name")
    report.add_argument("--storage", help="where runs live (a folder or s3://bucket/prefix)")
    compare = commands.add_parser("compare", help="per-task accuracy differences between two runs, or two "
                                                  "systems of one run (paired bootstrap CI, McNemar p)")
    compare.add_argument("run", help="run A: its folder or URI; with --storage, its name")
    compare.add_argument("run_b", nargs="?", help="run B (default: run A, with --system and --system-b)")
    compare.add_argument("--storage", help="where runs live (a folder or s3://bucket/prefix)")
    compare.add_argument("--system", help="A's system, e.g. base or mixture (default: every system both runs "
                                          "evaluated)")
    compare.add_argument("--system-b", help="B's system (default: the same as --system)")
    pull = commands.add_parser("pull", help="copy a run from its storage to a local folder")
    pull.add_argument("run", help="the run's name (with --storage) or its URI")
    pull.add_argument("--storage", help="where runs live, e.g. s3://bucket/prefix")
    pull.add_argument("--to", type=Path, help="the local folder (default: runs/<run name>)")


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="one system of a run as a folder that plain transformers + peft (or "
                                                 "vLLM) load: a LoRA adapter, or merged into the student")
    export.add_argument("run", help="the run's folder or URI; with --storage, its name")
    export.add_argument("--storage", help="where runs live (a folder or s3://bucket/prefix)")
    export.add_argument("--task", required=True, help="the task whose system to export")
    export.add_argument("--system", required=True,
                        help="expert, expert-<seen task>, multitask, full_finetune, fewshot_lora, mixture or "
                             "mixture-<method> (as the report names them); a gate mixture cannot be exported")
    export.add_argument("--to", type=Path, required=True, help="a new (or empty) folder to write it to")
    export.add_argument("--merge", action="store_true",
                        help="merge the adapter into the student's weights (a plain transformers model, fp32)")
    export.add_argument("--seed", type=int, help="which of the run's seeds (default: its first)")
    export.add_argument("--push-to-hub", metavar="REPO",
                        help="also upload the folder to this Hugging Face hub repository (private; needs HF_TOKEN)")


def _add_examples(commands) -> None:
    examples = commands.add_parser("examples", help="list the example configs shipped with modecotd, or write one "
                                                    "out to edit (each also runs by name: modecotd run quickstart)")
    examples.add_argument("name", nargs="?", help="the example to write out (default: list them)")
    examples.add_argument("--to", type=Path, default=Path("."),
                          help="the folder to write it to, as <name>.yaml (default: this folder)")


def _add_check(commands) -> None:
    check = commands.add_parser("check", help="validate a config, load its tasks and check what a run would refuse "
                                                 "(models, question lengths, the API key variable), without running")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_cluster(commands) -> None:
    cluster = commands.add_parser("cluster", help="start or stop a local Ray cluster with its dashboard")
    cluster.add_argument("action", choices=["up", "down"])
    cluster.add_argument("--num-cpus", type=int, help="CPUs of a single-node cluster")
    cluster.add_argument("--workers", type=int, default=0,
                         help="worker nodes to start beside the head on this machine (a multi-node cluster)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1)
    cluster.add_argument("--port", type=int, help="the GCS port (up: default 6379; down: stop only the cluster on "
                                                  "this port, default every cluster `cluster up` started)")
    cluster.add_argument("--dashboard-port", type=int, default=8265)
    cluster.add_argument("--dashboard-host", default="127.0.0.1",
                         help="the interface the dashboard and Jobs API listen on (default 127.0.0.1, this machine "
                              "only; 0.0.0.0 for every interface: the token is then sent over plain HTTP)")
    cluster.add_argument("--isolated", action="store_true",
                         help="each worker node in its own mount namespace, sharing no /tmp, home, ./runs or "
                              "model cache with this machine, as a node on another machine (needs root)")


SHARED_HELP = {
    "config": "YAML config file, or a built-in name such as 'quickstart'",
    "address": "the Ray cluster: host:6379 (GCS) for run and tune, http://host:8265 (dashboard) for the job "
               "commands (default: $RAY_ADDRESS)",
    "storage": "where runs live: a folder, a mount every node shares, or s3://bucket/prefix / gs://bucket/prefix",
    "run_dir": "this run's own folder or URI (default: <storage>/<name>)",
    "overrides": "override a config key, e.g. --set distill.epochs=1 (repeatable)",
    "stages": f"only this stage ({', '.join(STAGES)}; repeatable)",
    "submission_id": "the job's submission id (modecotd list shows them)",
    "action": "up: start a local cluster (token authentication on); down: stop the clusters up started",
    "cpus_per_worker": "CPUs of each worker node (default 1)",
    "dashboard_port": "the dashboard's and Jobs API's port (default 8265)",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modecotd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "urllib3", "filelock", "deepspeed", "DeepSpeed", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(args) -> int:
    from modecotd.config_loading import load_config

    overrides = list(args.overrides) + ([f"storage={args.storage}"] if args.storage else [])
    config = load_config(args.config, overrides)  # a bad config is refused before the heavy imports
    from modecotd.jobs.driver import run_pipeline

    outcome = run_pipeline(config, args.run_dir, address=args.address, stages=args.stages, take_over=args.take_over,
                           allow_plain_token=args.allow_http_token)
    print(_summary(outcome.storage.read_text(ReportFiles.MARKDOWN)))
    print(f"report: {outcome.report}")
    if outcome.failures:
        for unit, error in outcome.failures.items():
            print(f"failed: {unit}: {error}", file=sys.stderr)
        return 1
    return 0


def _summary(text: str) -> str:
    """The report's "What came out" section, for the terminal."""
    start = text.find("## What came out")
    end = text.find("\n## ", start + 1)
    return text[start:end].strip() if start >= 0 else ""


def _tune(args) -> int:
    """`run --stage mix` with the search space from the command line on top of the config's."""
    overrides = list(args.overrides)
    for key in TUNE_GRID:
        value = getattr(args, key)
        if value is not None:
            items = ["null" if v.strip() == "all" else v.strip() for v in value.split(",")]
            overrides.append(f"mixture.{key}=[{','.join(items)}]")
    for key in ("optimizer", "scheduler"):
        if getattr(args, key) is not None:
            overrides.append(f"mixture.{key}={getattr(args, key)}")
    args.overrides, args.stages = overrides, ["mix"]
    return _run(args)


def _submit(args) -> int:
    from modecotd.cluster import jobs

    overrides = list(args.overrides) + ([f"storage={args.storage}"] if args.storage else [])
    if args.exclude and not args.working_dir:
        raise UserError("--exclude needs --working-dir (without it only the config and its data files are sent)")
    submission_id = jobs.submit(Path(args.config), address=args.address, run_dir=args.run_dir, stages=args.stages,
                                overrides=overrides, pip=args.pip, working_dir=args.working_dir,
                                excludes=args.exclude, submission_id=args.submission_id,
                                say=lambda line: print(line, file=sys.stderr), allow_plain_token=args.allow_http_token)
    address = jobs.address_or_default(args.address)
    print(f"submitted {submission_id} to {address}")
    print(f"follow it: modecotd logs {submission_id} --follow --address {address}")
    if not args.wait:
        return 0
    for chunk in jobs.logs(submission_id, args.address, follow=True, allow_plain_token=args.allow_http_token):
        print(chunk, end="", flush=True)
    state = jobs.wait(submission_id, args.address, allow_plain_token=args.allow_http_token)
    print(f"{submission_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _jobs(args) -> int:
    from modecotd.cluster import jobs

    if args.command == "status":
        info = jobs.status(args.submission_id, args.address, args.allow_http_token)
        print(f"{info['submission_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        print(f"  run {info['metadata'].get('run')}, stages {info['metadata'].get('stages')}, "
              f"run folder {info['metadata'].get('run_dir')}")
        return 0
    if args.command == "logs":
        for chunk in jobs.logs(args.submission_id, args.address, args.follow, args.allow_http_token):
            print(chunk, end="", flush=True)
        return 0
    if args.command == "stop":
        stopping = jobs.stop(args.submission_id, args.address, args.allow_http_token)
        print(f"{args.submission_id}: {'stopping' if stopping else 'not running'}")
        return 0
    for run in jobs.list_runs(args.address, args.allow_http_token):
        print(f"{run['submission_id']}  {run['status']:<10} run {run['run']}, stages {run['stages']}")
    return 0


def _run_storage(args, run: str | None = None):
    """The storage of the run named on the command line (a folder, a URI, or a name under --storage);
    ``run`` instead of ``args.run`` when given."""
    from modecotd.storage import Storage

    run = run or args.run
    location = f"{args.storage.rstrip('/')}/{run}" if args.storage else run
    storage = Storage(location)
    if not storage.exists("config.yaml"):
        raise UserError(f"{storage.describe()}: no modecotd run there (no config.yaml)")
    return storage


def _report(args) -> int:
    from modecotd.report import build_report

    storage = _run_storage(args)
    try:
        path = build_report(storage)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    print(_summary(storage.read_text(ReportFiles.MARKDOWN)))
    print(f"report: {path}")
    return 0


def _compare(args) -> int:
    from modecotd.compare import compare, render_comparison

    run_b = _run_storage(args, args.run_b) if args.run_b else None
    print(render_comparison(compare(_run_storage(args), run_b, args.system, args.system_b)))
    return 0


def _pull(args) -> int:
    """The run's current units (see :class:`modecotd.run_view.RunView`), each file checked against
    its manifest's sha256, and the run's own files (config, plan, report), into a local folder;
    Ray's checkpoints, unfinished shards and trials, staging folders and stale units are left."""
    from modecotd.artifacts import verified_download
    from modecotd.lease import LEASE
    from modecotd.run_view import RunView
    from modecotd.storage import local_path

    storage = _run_storage(args)
    view = RunView(storage)
    target = args.to or Path("runs") / args.run.rstrip("/").rsplit("/", 1)[-1]
    current, stale = view.units()
    wanted: list[tuple[str, dict | None, str]] = []  # (file, its facts in a manifest or None, unit prefix)
    for prefix in current:
        manifest = view.manifest(prefix)
        listed = manifest.get("files") if manifest else None
        if isinstance(listed, dict):
            wanted += [(f"{prefix}/{name}", facts, prefix) for name, facts in sorted(listed.items())]
            wanted.append((f"{prefix}/manifest.json", None, prefix))
    in_units = tuple(f"{prefix}/" for prefix in current + stale)
    wanted += [(name, None, "") for name in storage.files()
               if not name.startswith(("ray/", "rationales/.shards/") + in_units)
               and not any(part.startswith(".") and part != ".." for part in name.split("/"))  # staging; ".." refused below
               and name != LEASE]
    targets = [local_path(target, name) for name, _, _ in wanted]  # every name checked before anything is written
    total = 0
    for index, ((name, facts, prefix), path) in enumerate(zip(wanted, targets), 1):
        if facts is None:
            storage.download(name, path)
        else:
            verified_download(storage, prefix, name[len(prefix) + 1:], facts.get("sha256"), path)
        total += path.stat().st_size
        print(f"\rpull: {index}/{len(wanted)} files, {total / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if stale:
        print(f"left out {len(stale)} unit(s) the run's plan no longer wants (a failed redo, or a system the "
              f"config dropped): {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}")
    print(f"pulled {storage.describe()} into {target} ({len(wanted)} files, each unit's checked against its "
          f"manifest); report: {target / ReportFiles.MARKDOWN}")
    return 0


def _export(args) -> int:
    from modecotd.export import export, push_to_hub

    record = export(_run_storage(args), args.task, args.system, args.to, merge=args.merge, seed=args.seed)
    accuracy = (record.get("evaluation") or {}).get("accuracy_strict")
    print(f"exported {record['system']} of {record['task']} ({record['kind']}) to {args.to}"
          + ("" if accuracy is None else f"; its accuracy in the run: {100 * accuracy:.1f}%")
          + f"; model card: {args.to / 'README.md'}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(args.to, args.push_to_hub)}")
    return 0


def _examples(args) -> int:
    from modecotd.config_loading import builtin_configs

    shipped = builtin_configs()
    if args.name is None:
        for name, path in shipped.items():
            first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
            print(f"{name:<18} {first}")
        print("write one out: modecotd examples NAME [--to DIR]; run one as it is: modecotd run NAME")
        return 0
    if args.name not in shipped:
        raise UserError(f"no example {args.name!r}; examples: {', '.join(shipped)}")
    target = args.to / f"{args.name}.yaml"
    if target.exists():
        raise UserError(f"{target}: exists; give another --to folder (nothing was overwritten)")
    args.to.mkdir(parents=True, exist_ok=True)
    target.write_text(shipped[args.name].read_text())
    print(f"wrote {target}: edit it (data paths in it are relative to its folder), then: modecotd run {target}")
    return 0


def _check(args) -> int:
    from modecotd.config_loading import load_config

    config = load_config(args.config, args.overrides)  # a bad config is refused before the heavy imports
    from modecotd.jobs.driver import check_inputs, load_tasks

    tasks = load_tasks(config)
    check_inputs(config, tasks)
    for name, data in tasks.items():
        print(f"{name}: {data.role.value}, {data.kind.value}, train {len(data.train)}, "
              f"few-shot {len(data.fewshot)}, test {len(data.test)}")
    return 0


def _cluster(args) -> int:
    from modecotd.cluster import local

    if args.action == "up":
        port = args.port or local.DEFAULT_GCS_PORT
        address = local.up(args.num_cpus, port=port, dashboard_port=args.dashboard_port, workers=args.workers,
                           cpus_per_worker=args.cpus_per_worker, isolated=args.isolated,
                           dashboard_host=args.dashboard_host)
        security = (f"token authentication on: {local.token_file()}" if os.environ.get("RAY_AUTH_MODE") == "token"
                    else "token authentication OFF: RAY_AUTH_MODE says so")
        print(f"Ray cluster up ({1 + args.workers} nodes): modecotd run CONFIG --address {address}; "
              f"dashboard and Jobs API: http://{args.dashboard_host}:{args.dashboard_port} ({security})")
    else:
        stopped = local.down(args.port)
        print(f"stopped the Ray cluster{'s' if len(stopped) > 1 else ''} on port {', '.join(map(str, stopped))}"
              if stopped else "no cluster started by `modecotd cluster up` is running here; nothing stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    from modecotd.cluster.auth import make_token_file, use_token_if_available

    if args.command in ("run", "tune") and not (args.address or os.environ.get("RAY_ADDRESS")):
        make_token_file()  # the private cluster's token (0600) on a machine that has none yet, before Ray is imported
    use_token_if_available()  # before anything imports Ray
    handlers = {"run": _run, "tune": _tune, "submit": _submit, "status": _jobs, "logs": _jobs, "stop": _jobs,
                "list": _jobs, "report": _report, "compare": _compare, "pull": _pull, "export": _export,
                "examples": _examples, "check": _check,
                "cluster": _cluster}
    install_interrupt_handler()
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"modecotd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modecotd: interrupted; finished units are kept: run the same command again to resume",
              file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        print(f"modecotd: error: {disk_problem(exc)}", file=sys.stderr)
        return 1


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}  # the run folder's disk, not the run, is at fault


def disk_problem(exc: OSError) -> str:
    """One line for a full or read-only disk: where, why, and that committed units are kept."""
    where = f"{exc.filename}: " if exc.filename else ""
    return (f"{where}{exc.strerror or exc}: the stage stopped; units committed before are kept: free space (or "
            "make the folder writable) and run the same command again")


def install_interrupt_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt in the main thread, which stops the run and shuts down the Ray
    work it started; a second Ctrl-C while that clean-up runs exits at once. Ray Tune's own
    handler (which lets running trials finish first) is switched off so that one Ctrl-C is enough."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    pressed = []

    def on_sigint(signum, frame):
        if pressed:
            os._exit(INTERRUPTED)
        pressed.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


if __name__ == "__main__":
    sys.exit(main())
