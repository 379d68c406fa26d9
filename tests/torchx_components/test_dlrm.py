"""The torchx component lints, and the README's launch commands materialize on each scheduler (dry run)."""

import ast
import inspect
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from torchx.specs.file_linter import validate

from dqrm.torchx_components.dlrm import train

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "torchx_components" / "dlrm.py"
README = ROOT / "README.md"


@dataclass(kw_only=True)
class Launch:
    """One README command line, `torchx run [RUN OPTIONS] COMPONENT [COMPONENT ARGS] -- SCRIPT ARGS`."""

    argv: list[str]
    options: dict[str, str]
    params: dict[str, str]
    script_args: list[str]

    def param(self, name: str) -> str:
        """A component argument as torchx sees it: given on the line, else the component's default."""
        return self.params.get(name, str(inspect.signature(train).parameters[name].default))


def parse_launch(argv: list[str]) -> Launch:
    assert argv[:2] == ["torchx", "run"], shlex.join(argv)
    component = next(i for i, word in enumerate(argv) if word.endswith(":train"))
    assert (ROOT / argv[component].removesuffix(":train")).resolve() == COMPONENT
    options = dict(zip(argv[2:component:2], argv[3:component:2]))
    split = argv.index("--") if "--" in argv else len(argv)
    params = dict(zip(argv[component + 1:split:2], argv[component + 2:split:2]))
    return Launch(argv=argv, options=options, params={k.removeprefix("--"): v for k, v in params.items()},
                  script_args=argv[split + 1:])


def readme_launches() -> dict[str, Launch]:
    """The README's `torchx run` lines (a line starting with it, continued by trailing backslashes), by scheduler."""
    launches, pending = {}, None
    for line in README.read_text().splitlines():
        if pending is None and not line.startswith("torchx run "):
            continue
        pending = (pending or "") + line.removesuffix("\\")
        if not line.endswith("\\"):
            launch = parse_launch(shlex.split(pending))
            scheduler = launch.options["-s"]
            assert scheduler not in launches, f"two README commands for {scheduler}"
            launches[scheduler] = launch
            pending = None
    return launches


def dryrun(launch: Launch) -> str:
    """The scheduler request `torchx run --dryrun` prints for the README's command line."""
    torchx = Path(sys.executable).with_name("torchx")
    proc = subprocess.run([str(torchx), "run", "--dryrun", *launch.argv[2:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("=== SCHEDULER REQUEST ===", 1)[1].strip()


def assert_trains(command: str, launch: Launch) -> None:
    assert command.startswith("torchrun "), command
    assert f"--nnodes {launch.param('nnodes')} --nproc_per_node {launch.param('nproc_per_node')} " in command
    assert command.endswith(f" -m dqrm.pipeline.train {shlex.join(launch.script_args)}"), command


def test_component_passes_torchx_lint():
    assert validate(str(COMPONENT), "train") == []


def test_component_passes_the_run_dir_to_the_job_once():
    (role,) = train("--config", "tiny", run_dir="/runs/a").roles
    assert role.args[1].endswith(" -m dqrm.pipeline.train --config tiny --run-dir /runs/a"), role.args[1]
    (role,) = train("--config", "tiny").roles
    assert "--run-dir" not in role.args[1]
    for named in (["--run-dir", "/runs/b"], ["--run-dir=/runs/b"], ["--set", "run_dir=/runs/b"]):
        with pytest.raises(ValueError, match="both name the run dir"):
            train("--config", "tiny", *named, run_dir="/runs/a")


def test_readme_launches_on_each_scheduler():
    assert sorted(readme_launches()) == ["kubernetes", "local_cwd", "slurm"]


def test_readme_local_command_runs_the_job_here():
    launch = readme_launches()["local_cwd"]
    request = ast.literal_eval(dryrun(launch))
    (replica,) = request["role_params"]["train"]
    assert replica["cwd"] == str(ROOT)
    assert replica["args"][:2] == ["bash", "-c"]
    assert_trains(replica["args"][2], launch)


def test_readme_kubernetes_command_asks_for_what_it_names():
    launch = readme_launches()["kubernetes"]
    # Without it, torchx builds a patched image from the working directory through a local Docker daemon.
    assert launch.options.get("--workspace") == "", "the README's Kubernetes command needs --workspace \"\""
    job = yaml.safe_load(dryrun(launch))
    queue = launch.options["-cfg"].removeprefix("queue=")
    assert job["spec"]["queue"] == queue
    assert job["spec"]["maxRetry"] == int(launch.param("max_retries"))
    assert len(job["spec"]["tasks"]) == int(launch.param("nnodes"))
    for task in job["spec"]["tasks"]:
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == launch.param("image")
        assert container["resources"]["limits"] == {"cpu": f"{int(launch.param('cpu')) * 1000}m",
                                                    "memory": f"{launch.param('memMB')}M",
                                                    "nvidia.com/gpu": launch.param("gpu")}
        assert container["command"][:2] == ["bash", "-c"]
        assert_trains(container["command"][2], launch)


def test_readme_slurm_command_asks_for_what_it_names():
    launch = readme_launches()["slurm"]
    script = dryrun(launch)
    partition = launch.options["-cfg"].removeprefix("partition=")
    hosts = [line for line in script.splitlines() if line.startswith("#SBATCH --job-name=")]
    assert len(hosts) == int(launch.param("nnodes"))
    for host in hosts:
        assert (f"--requeue --partition={partition} --ntasks-per-node=1 --cpus-per-task={launch.param('cpu')} "
                f"--mem={launch.param('memMB')} --gpus-per-task={launch.param('gpu')}") in host
    assert f"export TORCHX_MAX_RETRIES={launch.param('max_retries')}\n" in script
    commands = [word for word in shlex.split(script.split("set +e\n", 1)[1].split("\nexitcode=")[0])
                if word.startswith("torchrun ")]
    assert len(commands) == int(launch.param("nnodes"))
    for command in commands:
        assert_trains(command, launch)
