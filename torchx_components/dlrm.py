"""torchx component for a dqrm training job: TorchRec DLRM under ``torch.distributed.run`` (``dist.ddp``)."""

# No `from __future__ import annotations`: torchx reads the parameter types at run time to parse CLI values.


from typing import Dict, Optional

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
    """
    return dist.ddp(
        *script_args,
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
    )
