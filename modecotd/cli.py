"""The `modecotd` command: run the pipeline, check a config, manage a local cluster."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from modecotd.errors import UserError

log = logging.getLogger("modecotd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modecotd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the four stages (teacher, distill, mix, evaluate) on Ray")
    run.add_argument("config", help="YAML config file, or a built-in name such as 'quickstart'")
    run.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    run.add_argument("--run-dir", type=Path, help="where artifacts go (default: runs/<name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set distill.epochs=1 (repeatable)")

    check = commands.add_parser("check", help="validate a config and load its tasks, without running")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    cluster = commands.add_parser("cluster", help="start or stop a local Ray cluster with its dashboard")
    cluster.add_argument("action", choices=["up", "down"])
    cluster.add_argument("--num-cpus", type=int)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "urllib3", "filelock", "deepspeed", "DeepSpeed", "transformers", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(args) -> int:
    from modecotd.config import load_config
    from modecotd.jobs.driver import run_pipeline

    config = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / config.name
    outcome = run_pipeline(config, run_dir, address=args.address)
    print(_summary(outcome.report))
    print(f"report: {outcome.report}")
    if outcome.failures:
        for unit, error in outcome.failures.items():
            print(f"failed: {unit}: {error}", file=sys.stderr)
        return 1
    return 0


def _summary(report_path: Path) -> str:
    """The report's "What came out" section, for the terminal."""
    text = report_path.read_text()
    start = text.find("## What came out")
    end = text.find("\n## ", start + 1)
    return text[start:end].strip() if start >= 0 else ""


def _check(args) -> int:
    from modecotd.config import load_config
    from modecotd.jobs.driver import load_tasks

    config = load_config(args.config, args.overrides)
    for name, data in load_tasks(config).items():
        print(f"{name}: {data.role.value}, {data.kind.value}, train {len(data.train)}, "
              f"few-shot {len(data.fewshot)}, test {len(data.test)}")
    return 0


def _cluster(args) -> int:
    from modecotd.cluster import local

    if args.action == "up":
        print(f"Ray cluster up: modecotd run CONFIG --address {local.up(args.num_cpus)}")
    else:
        local.down()
        print("Ray cluster stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modecotd.cluster.auth import use_token_if_available

    use_token_if_available()  # before anything imports Ray
    handlers = {"run": _run, "check": _check, "cluster": _cluster}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"modecotd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
