"""The torchx component lints, and the README's launch commands materialize on each scheduler (dry run); the
Kubernetes pods are checked offline against the Kubernetes API schema."""

import ast
import inspect
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from torchx.schedulers.kubernetes_scheduler import RESERVED_MEMMB, RESERVED_MILLICPU
from torchx.specs import VolumeMount, parse_mounts
from torchx.specs.file_linter import validate

from dqrm.torchx_components.dlrm import train

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "torchx_components" / "dlrm.py"
README = ROOT / "README.md"
# The Kubernetes version whose API schema the dry run's pods are checked against (strictly: an unknown field is an
# error): the oldest kubernetes-validate 1.37.0 ships. Fields of the core v1 Pod are not removed, so a pod valid here is
# valid on later clusters too, while a newer schema would pass fields an older cluster refuses.
KUBERNETES = "1.25"


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

    def cfg(self) -> dict[str, str]:
        """The scheduler options, ``-cfg key=value,key=value``."""
        return dict(kv.split("=", 1) for kv in self.options["-cfg"].split(","))


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
    """The README's `torchx run` lines (a line starting with it, continued by trailing backslashes), by scheduler, and
    for Slurm by scheduler and partition (``slurm/gpu``)."""
    launches, pending = {}, None
    for line in README.read_text().splitlines():
        if pending is None and not line.startswith("torchx run "):
            continue
        pending = (pending or "") + line.removesuffix("\\")
        if not line.endswith("\\"):
            launch = parse_launch(shlex.split(pending))
            scheduler = launch.options["-s"]
            if scheduler == "slurm":
                scheduler += "/" + launch.cfg()["partition"]
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
    run_dir = ["--run-dir", launch.params["run_dir"]] if "run_dir" in launch.params else []
    assert command.endswith(f" -m dqrm.pipeline.train {shlex.join([*launch.script_args, *run_dir])}"), command


def flag(command: str, name: str) -> str:
    """The value of ``name`` in a shell command line."""
    words = shlex.split(command)
    assert name in words, f"no {name} in {command}"
    return words[words.index(name) + 1]


def mount_holding(path: str, mounts: list[dict]) -> dict:
    """The container's volume mount that ``path`` is on (the deepest one holding it)."""
    holding = [m for m in mounts if Path(path).is_relative_to(m["mountPath"])]
    assert holding, f"{path} is on none of the mounts {[m['mountPath'] for m in mounts]}"
    return max(holding, key=lambda m: len(Path(m["mountPath"]).parts))


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
    assert sorted(readme_launches()) == ["kubernetes", "local_cwd", "slurm/debug", "slurm/gpu"]


def test_readme_local_command_runs_the_job_here():
    launch = readme_launches()["local_cwd"]
    request = ast.literal_eval(dryrun(launch))
    (replica,) = request["role_params"]["train"]
    assert replica["cwd"] == str(ROOT)
    assert replica["args"][:2] == ["bash", "-c"]
    assert_trains(replica["args"][2], launch)


@pytest.fixture(scope="module")
def kubernetes_job() -> tuple[Launch, dict]:
    """The README's Kubernetes command and the Volcano Job its dry run makes."""
    launch = readme_launches()["kubernetes"]
    # Without it, torchx builds a patched image from the working directory through a local Docker daemon.
    assert launch.options.get("--workspace") == "", "the README's Kubernetes command needs --workspace \"\""
    return launch, yaml.safe_load(dryrun(launch))


def test_readme_kubernetes_command_asks_for_what_it_names(kubernetes_job):
    launch, job = kubernetes_job
    queue = launch.cfg()["queue"]
    assert job["spec"]["queue"] == queue
    assert job["spec"]["maxRetry"] == int(launch.param("max_retries"))
    assert len(job["spec"]["tasks"]) == int(launch.param("nnodes"))
    mcpu, mem_mb, gpus = int(launch.param("cpu")) * 1000, int(launch.param("memMB")), launch.param("gpu")
    for task in job["spec"]["tasks"]:
        assert task["maxRetry"] == int(launch.param("max_retries"))
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == launch.param("image")
        assert container["resources"]["limits"] == {"cpu": f"{mcpu}m", "memory": f"{mem_mb}M", "nvidia.com/gpu": gpus}
        # torchx requests the whole host less what it leaves to the node's own daemons
        assert container["resources"]["requests"] == {"cpu": f"{mcpu - RESERVED_MILLICPU}m",
                                                      "memory": f"{mem_mb - RESERVED_MEMMB}M", "nvidia.com/gpu": gpus}
        assert container["command"][:2] == ["bash", "-c"]
        assert_trains(container["command"][2], launch)


def test_readme_kubernetes_pods_are_valid_and_mount_the_data_and_a_shared_run_dir(kubernetes_job):
    """Each task's pod template, checked offline as a v1 Pod (the Volcano Job around it has no schema here): the
    README's volumes are the pod's, the data read-only under --data-dir and the run dir writable under --run-dir."""
    launch, job = kubernetes_job
    assert "mounts" in launch.params, "the README's Kubernetes command mounts no volume"
    named = parse_mounts(launch.params["mounts"].split(","))
    assert all(isinstance(m, VolumeMount) for m in named), named
    for task in job["spec"]["tasks"]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": task["template"]["metadata"],
               "spec": task["template"]["spec"]}
        assert kubernetes_validate.validate(pod, KUBERNETES, strict=True) == KUBERNETES
        (container,) = pod["spec"]["containers"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        mounted = {m["mountPath"]: (claims.get(m["name"]), m.get("readOnly", False))
                   for m in container["volumeMounts"]}
        assert {m.dst_path: (m.src, m.read_only) for m in named}.items() <= mounted.items(), mounted

        command = container["command"][2]
        data = mount_holding(flag(command, "--data-dir"), container["volumeMounts"])
        assert data["name"] in claims and data["readOnly"] is True, data
        run = mount_holding(flag(command, "--run-dir"), container["volumeMounts"])
        # that the claim is ReadWriteMany (every pod writes there) is the claim's access mode, not in the pod spec
        assert run["name"] in claims and not run.get("readOnly", False), run


@pytest.mark.parametrize("partition", ["gpu", "debug"])
def test_readme_slurm_commands_ask_for_what_they_name(partition):
    """The GPU cluster's command (dry run only) and the small cluster's, which tests/torchx_components/test_slurm.py
    also runs on a real Slurm."""
    launch = readme_launches()[f"slurm/{partition}"]
    # Without it, torchx would copy the working directory into job_dir and run the job from the copy.
    assert launch.options.get("--workspace") == "", "the README's Slurm commands need --workspace \"\""
    script = dryrun(launch)
    cfg = launch.cfg()
    # the job's output files (slurm-*.out, which `torchx log` reads) go to the run dir's slurm/ on the shared storage
    assert cfg["job_dir"] == f"{launch.param('run_dir')}/slurm"
    hosts = [line for line in script.splitlines() if line.startswith("#SBATCH --job-name=")]
    assert len(hosts) == int(launch.param("nnodes"))
    gpus = f" --gpus-per-task={launch.param('gpu')}" if launch.param("gpu") != "0" else ""
    for host in hosts:
        assert host.endswith(f"--requeue --partition={partition} --ntasks-per-node=1 "
                             f"--cpus-per-task={launch.param('cpu')} --mem={launch.param('memMB')}{gpus}"), host
    assert f"export TORCHX_MAX_RETRIES={launch.param('max_retries')}\n" in script
    commands = [word for word in shlex.split(script.split("set +e\n", 1)[1].split("\nexitcode=")[0])
                if word.startswith("torchrun ")]
    assert len(commands) == int(launch.param("nnodes"))
    for command in commands:
        assert_trains(command, launch)
