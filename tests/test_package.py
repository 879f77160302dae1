"""The package as a user installs it: a wheel built from the source, installed in a new virtual
environment, runs its command and ships its examples; the dependencies it declares are the ones it
imports."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("modecotd", "jobs", "tuning", "cluster", "examples")
# an import name -> the distribution that provides it, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "grpc": "grpcio", "google": "google-auth", "pydantic_core": "pydantic",
                 "botocore": "boto3", "mlflow": "mlflow-skinny"}
OPTIONAL = {"vllm", "mlflow", "wandb", "gguf"}  # imported only where its extra is installed
NOT_IMPORTED = {"accelerate": "transformers needs it for device_map (modecotd.models.load_lm)",
                "cmaes": "optuna's CMA-ES sampler imports it (mixture.optimizer cmaes)",
                "ray": "imported as ray (declared with its extras)"}


def declared() -> tuple[set[str], dict[str, list[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda requirement: re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower().replace("-", "_")
    return ({name(r) for r in project["dependencies"]},
            {extra: [name(r) for r in reqs] for extra, reqs in project["optional-dependencies"].items()})


def imported() -> set[str]:
    """The top-level names of every module the package's code imports, standard library left out."""
    names = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("modecotd", "__future__")}


def test_every_imported_package_is_declared_and_every_declared_one_is_used():
    required, extras = declared()
    wanted = {DISTRIBUTIONS.get(n, n).lower().replace("-", "_") for n in imported()}
    optional = {DISTRIBUTIONS.get(n, n).lower().replace("-", "_") for n in OPTIONAL}
    assert wanted - optional <= required, f"imported but not declared: {sorted(wanted - optional - required)}"
    assert optional <= {d for names in extras.values() for d in names}
    unused = required - wanted - {d.replace("-", "_") for d in NOT_IMPORTED}
    assert unused == set(), f"declared but never imported: {sorted(unused)}"
    assert "gguf" in extras["demo"] and "gguf" not in required


def test_a_built_wheel_installs_in_a_new_environment_with_its_command_and_examples(tmp_path):
    source = tmp_path / "source"
    for name in (*SOURCES, "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, text=True)
    [wheel] = list((tmp_path / "dist").glob("modecotd-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies come from this environment (installing torch and Ray anew would take minutes);
    # modecotd itself only from the wheel
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True)
    outside = tmp_path / "elsewhere"  # not the source folder: nothing may come from the checkout
    outside.mkdir()

    def run(*args) -> str:
        done = subprocess.run([str(venv / "bin" / "modecotd"), *args], cwd=outside, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert run("--version").strip() == f"modecotd {version}"
    assert "quickstart" in run("examples") and "paper-small" in run("examples")
    run("examples", "quickstart", "--to", "mine")
    assert (outside / "mine" / "quickstart.yaml").read_text() == (ROOT / "examples" / "quickstart.yaml").read_text()
    where = subprocess.run([str(python), "-c", "import modecotd, modecotd.jobs.driver, modecotd.tuning.mixture_search, "
                            "modecotd.cluster.local, modecotd.export; print(modecotd.__file__)"],
                           cwd=outside, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(site)


def test_the_minimum_versions_file_pins_every_dependency_at_its_declared_lower_bound():
    """tests/minimum-versions.txt (what `make test-minimum` installs) and pyproject.toml's lower bounds
    say the same: a raised bound without a tested minimum, or the reverse, fails here."""
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    key = lambda name: name.lower().replace("-", "_")
    bounds = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["demo"]:
        name, low = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([^,;\s]+)", requirement).groups()
        bounds[key(name)] = low
    pins = dict(line.split("==") for line in (ROOT / "tests/minimum-versions.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {key(name): version for name, version in pins.items()}
    torch = bounds.pop("torch")  # installed by the Makefile, the CPU build, not from the constraints file
    assert torch == "2.13"
    assert set(pins) == set(bounds), set(pins) ^ set(bounds)
    differ = {name: (bounds[name], pins[name]) for name in bounds if Version(bounds[name]) != Version(pins[name])}
    assert not differ, differ
