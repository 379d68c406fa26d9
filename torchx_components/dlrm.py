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
    """Train a (quantized) DLRM with ``python -m pipeline.train``, one process per rank.

    Args:
        script_args: arguments to ``python -m pipeline.train`` (e.g. ``--config default --epochs 5``)
        image: container image (Kubernetes) or working directory (local_cwd, Slurm) holding this repository
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host; one per GPU on GPU hosts
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: memory per host in MB
        max_retries: restart budget: how many times torchrun restarts all workers after one fails (they resume
            from the latest checkpoint); also passed to the scheduler as its retry count
        env: extra environment variables
        rdzv_port: rendezvous port on the first host (multi-host jobs)
    """
    app = dist.ddp(
        *script_args,
        m="pipeline.train",
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
    # dist.ddp gives the count to the scheduler only (local schedulers ignore it); torchrun's own elastic restart
    # is what brings a killed worker back on every scheduler.
    role = app.roles[0]
    role.args = [a.replace("torchrun ", f"torchrun --max-restarts {max_retries} ", 1) for a in role.args]
    return app
