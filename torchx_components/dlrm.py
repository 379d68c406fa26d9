"""torchx component for a dqrm training job: TorchRec DLRM under ``torch.distributed.run`` (``dist.ddp``)."""

# No `from __future__ import annotations`: torchx reads the parameter types at run time to parse CLI values.


from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist


def train(
    *script_args: str,
    image: str = ".",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    run_dir: Optional[str] = None,
) -> specs.AppDef:
    """Train a (quantized) DLRM with ``python -m dqrm.pipeline.train``, one process per rank.

    Args:
        script_args: arguments to ``python -m dqrm.pipeline.train`` (e.g. ``--config default --epochs 5``)
        image: container image (Kubernetes) or working directory (local_cwd, Slurm) holding this repository
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host; one per GPU on GPU hosts
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: memory per host in MB
        max_retries: restart budget: how many times the scheduler reruns the job after a worker fails (every
            attempt resumes from the latest complete checkpoint); local runs get it from ``pipeline.launch``
        env: extra environment variables
        rdzv_port: rendezvous port on the first host (multi-host jobs)
        mounts: storage mounted into each host's container (Kubernetes, Docker; the local and Slurm schedulers
            ignore it), torchx's format, several joined by commas: ``type=volume,src=PVC,dst=/path[,readonly]`` (a
            PersistentVolumeClaim on Kubernetes) or ``type=bind,src=/host/path,dst=/path[,readonly]`` (a hostPath)
        run_dir: the job's run dir (checkpoints, logs, summary, exported model), passed on as ``--run-dir``; on a
            multi-host job it must be on storage every host sees (a mounted ReadWriteMany volume on Kubernetes, a
            shared file system on Slurm): every rank writes its part of each checkpoint into one folder
    """
    return dist.ddp(
        *script_args,
        *run_dir_args(script_args, run_dir),
        m="dqrm.pipeline.train",
        image=image,
        name="dqrm",
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )


def run_dir_args(script_args: tuple[str, ...], run_dir: Optional[str]) -> list[str]:
    """``--run-dir RUN_DIR`` for the script, or nothing; refused where the script args already name a run dir, as
    one of the two would be silently ignored."""
    if run_dir is None:
        return []
    named = [arg for arg in script_args if arg.split("=", 1)[0] == "--run-dir" or arg.startswith("run_dir=")]
    if named:
        raise ValueError(f"--run_dir {run_dir} and the script argument {named[0]} both name the run dir: "
                         f"give it once, as the component's --run_dir")
    return ["--run-dir", run_dir]
