"""Typed configuration of a training job; a named experiment is a function returning a ``JobConfig``."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Any

from dqrm.datasets.reader import ReaderConfig
from dqrm.datasets.schema import FEATURE_NAMES, NUM_SPARSE
from dqrm.datasets.synthetic import SyntheticConfig
from dqrm.quant.api import QuantSpec
from dqrm.sharding.comm import CommConfig
from dqrm.sharding.policy import PlanConfig

QUANT_MODES = ("fp32", "qat", "ptq")


MODEL_ARCHS = ("dlrm", "dcn")
MLP_INITS = ("torch", "dlrm")


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """Shapes of the DLRM (``torchrec.models.dlrm.DLRM``, or ``DLRM_DCN`` with ``arch='dcn'``)."""

    arch: str = "dlrm"
    """'dlrm': TorchRec's DLRM (dot interaction); 'dcn': DLRM_DCN (DCNv2 low-rank cross layers, MLPerf DLRMv2)."""
    dcn_num_layers: int = 3
    """Cross layers of the DCN interaction (arch='dcn' only)."""
    dcn_low_rank_dim: int = 512
    """Rank of each cross layer's two kernels (arch='dcn' only)."""
    embedding_dim: int = 16
    """Width of every embedding table (DLRM's dot interaction needs one width)."""
    num_embeddings: tuple[int, ...] = SyntheticConfig().cardinalities
    """Rows of each of the 26 tables; categorical hashes are taken modulo this."""
    dense_arch: tuple[int, ...] = (128, 64, 16)
    """Bottom MLP layer sizes; the last must equal embedding_dim."""
    over_arch: tuple[int, ...] = (256, 128, 1)
    """Top MLP layer sizes; the last must be 1."""
    mlp_init: str = "torch"
    """Initialization of the MLP layers: 'torch' (nn.Linear's kaiming-uniform weights, uniform biases) or 'dlrm'
    (facebookresearch/dlrm's: weights N(0, 2/(fan_in+fan_out)), biases N(0, 1/fan_out))."""

    def __post_init__(self) -> None:
        self.num_embeddings = tuple(self.num_embeddings)
        self.dense_arch, self.over_arch = tuple(self.dense_arch), tuple(self.over_arch)
        if len(self.num_embeddings) != NUM_SPARSE:
            raise ValueError(f"model.num_embeddings needs {NUM_SPARSE} entries, got {len(self.num_embeddings)}")
        for field in ("num_embeddings", "dense_arch", "over_arch"):
            bad = [(i, n) for i, n in enumerate(getattr(self, field)) if n < 1]
            if bad:
                raise ValueError(f"model.{field}[{bad[0][0]}] must be at least 1, got {bad[0][1]}")
        if not self.dense_arch or not self.over_arch:
            raise ValueError("model.dense_arch and model.over_arch need at least one layer each")
        if self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(f"model.dense_arch must end with embedding_dim={self.embedding_dim}, got {self.dense_arch}")
        if self.over_arch[-1] != 1:
            raise ValueError(f"model.over_arch must end with 1, got {self.over_arch}")
        if self.arch not in MODEL_ARCHS:
            raise ValueError(f"model.arch must be one of {MODEL_ARCHS}, got {self.arch!r}")
        if self.mlp_init not in MLP_INITS:
            raise ValueError(f"model.mlp_init must be one of {MLP_INITS}, got {self.mlp_init!r}")
        if self.dcn_num_layers < 1 or self.dcn_low_rank_dim < 1:
            raise ValueError(f"model.dcn_num_layers and model.dcn_low_rank_dim must be at least 1, got "
                             f"{self.dcn_num_layers} and {self.dcn_low_rank_dim}")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Where the data comes from and how it is batched."""

    data_dir: str = ""
    """Folder with train/val/test Parquet (files or folders of files); empty = the bundled synthetic data."""
    batch_size: int = 64
    """Training rows per batch on each rank (64 x 2 ranks = the paper's 128)."""
    eval_batch_size: int = 4096
    """Evaluation rows per batch on each rank."""
    shuffle: bool = True
    """Shuffle training rows within row groups, differently each epoch."""
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    """Shape of the synthetic dataset used when data_dir is empty."""
    vocab_dir: str = ""
    """Vocabulary written by ``datasets.convert --vocab-min-count`` (ids -> contiguous indices, 0 = rare or
    missing); empty = ``hash % num_embeddings``. ``model.num_embeddings`` must then be the vocabulary sizes + 1."""
    row_map: str = ""
    """Row map (``datasets.row_map``) folding each mapped table's rare ids onto one shared row; set by a byte budget
    (``quant.budget_bytes``), which writes it into the run dir; empty = every id its own row."""

    def __post_init__(self) -> None:
        for field in ("batch_size", "eval_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"data.{field} must be at least 1, got {getattr(self, field)}")

    def reader(self, *, train: bool, seed: int) -> ReaderConfig:
        vocab, row_map = self.vocab_dir or None, self.row_map or None
        if train:
            return ReaderConfig(batch_size=self.batch_size, shuffle=self.shuffle, seed=seed, vocab_dir=vocab,
                                row_map=row_map)
        return ReaderConfig(batch_size=self.eval_batch_size, vocab_dir=vocab, row_map=row_map)


EMBEDDING_OPTIMIZERS = ("sgd", "rowwise_adagrad")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """Plain SGD by default, as in the DQRM paper; row-wise Adagrad for the tables and Adagrad or Adam for the rest, as
    MLPerf's DLRM and TorchRec's examples train."""

    embedding: str = "sgd"
    """Optimizer of every embedding table, wherever the plan puts it: ``sgd`` or ``rowwise_adagrad`` (one
    accumulator per row: FBGEMM's fused ``EXACT_ROWWISE_ADAGRAD`` on the sharded tables, TorchRec's
    ``RowWiseAdagrad``, the same update, on the data-parallel ones)."""
    dense: str = "sgd"
    """Optimizer of every parameter that is not an embedding table (MLPs, cross layers): ``sgd``, ``adagrad`` or
    ``adam``."""
    lr: float = 0.1
    """Learning rate of the dense optimizer (MLPs)."""
    embedding_lr: float = 0.1
    """Learning rate of every embedding table, wherever the plan puts it: the sharded tables' fused (in-backward)
    optimizer and the data-parallel tables' (TorchRec keeps those as dense parameters), so that a placement change
    does not change the optimization."""
    eps: float = 1e-8
    """Epsilon of Adagrad, row-wise Adagrad and Adam (FBGEMM's default); unused by SGD."""

    def __post_init__(self) -> None:
        for name in ("lr", "embedding_lr", "eps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"optim.{name} must be a positive number, got {value}")
        for name, choices in (("embedding", EMBEDDING_OPTIMIZERS), ("dense", DENSE_OPTIMIZERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"optim.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


PROFILE_STEPS = re.compile(r"^(\d+):(\d+)$")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)``: the training steps A, A+1, .., B-1 (0-based, as a Python slice); ``""`` -> None."""
    if not text:
        return None
    m = PROFILE_STEPS.match(text.strip())
    if m is None or int(m[1]) >= int(m[2]):
        raise ValueError(f"--profile-steps {text!r} (observe.profile_steps): expected START:STOP, two step numbers "
                         f"with START < STOP naming the training steps to record as a Python slice does, counted "
                         f"from 0 (e.g. --profile-steps 100:110 records steps 100 to 109)")
    return int(m[1]), int(m[2])


@dataclasses.dataclass(kw_only=True)
class ObserveConfig:
    """What a job writes for watching it while it runs: TensorBoard events and a profiler window."""

    tensorboard: bool = True
    """Write TensorBoard event files into RUN_DIR/tensorboard (rank 0): train loss, samples/s, learning rates, QAT
    grid statistics and wire bytes every log_every_steps, and every evaluation (``tensorboard --logdir runs/``)."""
    log_every_steps: int = 200
    """Steps between two TensorBoard logs of the training scalars (the end of an epoch also logs); a log costs
    about 0.5 % of the default job's training time at 200 (bench/results/logging_overhead.txt)."""
    profile_steps: str = ""
    """START:STOP: record training steps START..STOP-1 (0-based) with torch.profiler into RUN_DIR/profile (a trace
    for Perfetto or TensorBoard per rank, and a table of the top ops); empty = no profiling."""

    def __post_init__(self) -> None:
        if self.log_every_steps < 1:
            raise ValueError(f"observe.log_every_steps must be at least 1, got {self.log_every_steps}")
        parse_profile_steps(self.profile_steps)


@dataclasses.dataclass(kw_only=True)
class JobConfig:
    """A whole training job."""

    name: str = "default"
    """Name of the experiment (the named config it came from)."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Shapes of the DLRM."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Where the rows come from and how they are batched."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Learning rates of the dense and the fused embedding optimizer."""
    quant_mode: str = "qat"
    """'fp32': no quantization; 'qat': train with fake-quant on `quant`'s grid, then export; 'ptq': train in
    float, quantize to `quant`'s grid after each epoch for evaluation, then export."""
    quant: QuantSpec = dataclasses.field(default_factory=QuantSpec)
    """The integer grid (bits, granularity, scale update period) for qat and ptq."""
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)
    """Table placement policy and overrides."""
    comm: CommConfig = dataclasses.field(default_factory=CommConfig)
    """Gradient and embedding communication compression."""
    observe: ObserveConfig = dataclasses.field(default_factory=ObserveConfig)
    """TensorBoard logging and the profiler window."""
    epochs: int = 5
    """Passes over the training split."""
    early_stop_epochs: int = 0
    """Stop before the next epoch once validation AUC has not improved for this many epochs (0 = run every epoch); the
    model exported is the last one trained."""
    limit_train_batches: int = 0
    """Stop each epoch after this many batches (0 = the whole split)."""
    limit_eval_batches: int = 0
    """Evaluate on at most this many batches per rank (0 = the whole split)."""
    eval_every_steps: int = 0
    """Also evaluate on the validation split every N training steps (0 = only at epoch end)."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N training steps, mid-epoch (0 = only at epoch end)."""
    checkpoint_keep: int = 2
    """Keep the newest N complete checkpoints; older ones are deleted once a newer one is complete (at least 1)."""
    seed: int = 0
    """Seed of model initialization and shuffling."""
    run_dir: str = "runs/default"
    """Where logs, checkpoints, metrics and plots go; a run dir with checkpoints is resumed."""

    def __post_init__(self) -> None:
        if self.quant_mode not in QUANT_MODES:
            raise ValueError(f"quant_mode must be one of {QUANT_MODES}, got {self.quant_mode!r}")
        if self.quant_mode == "fp32" and self.quant.mlp_compute != "float32":
            raise ValueError(f"quant.mlp_compute={self.quant.mlp_compute} applies to the fake-quantized MLPs of qat "
                             f"or ptq; quant_mode fp32 trains plain float32 MLPs (drop it, or use quant_mode qat)")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        for f in ("limit_train_batches", "limit_eval_batches", "eval_every_steps", "checkpoint_every_steps",
                  "early_stop_epochs"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")
        if self.checkpoint_keep < 1:
            raise ValueError(f"checkpoint_keep must be at least 1 (the newest checkpoint is always kept), got "
                             f"{self.checkpoint_keep}")
        self.check_table_names()

    def check_table_names(self) -> None:
        """Per-table settings must name this model's tables: a misspelt name would otherwise be ignored and the
        table silently trained with the default (``validate`` runs this again after ``--set`` overrides)."""
        tables = [f"t_{feature}" for feature in FEATURE_NAMES]
        for field, named in (("quant.table_bits", self.quant.table_bits), ("plan.overrides", self.plan.overrides)):
            unknown = sorted(set(named) - set(tables))
            if unknown:
                raise ValueError(f"{field}: no table named {', '.join(unknown)} (the tables are {tables[0]} .. "
                                 f"{tables[-1]}, one per categorical feature)")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


RESUME_MAY_CHANGE = ("epochs", "early_stop_epochs", "limit_train_batches", "limit_eval_batches", "eval_every_steps",
                     "checkpoint_every_steps", "checkpoint_keep", "run_dir", "name", "data.eval_batch_size",
                     "comm.count_bytes", "observe.tensorboard", "observe.log_every_steps", "observe.profile_steps")
"""Fields a resumed job may change: how long it runs, how it evaluates, checkpoints and logs, where it is."""
_PATH_FIELDS = ("data.data_dir", "data.vocab_dir", "data.row_map")


def resume_view(settings: dict) -> dict:
    """A (nested) config dict as a resume compares it: flattened to dotted fields (dict-valued fields whole), without
    ``RESUME_MAY_CHANGE``, and with paths resolved, so that one folder spelled two ways (relative, absolute) is one,
    and a file inside the run dir named relative to it, so that a run dir moved or copied elsewhere resumes."""
    flat = _flatten(json.loads(json.dumps(settings)))
    run_dir = Path(flat.get("run_dir") or ".").resolve()
    for field in _PATH_FIELDS:
        if flat.get(field):
            path = Path(flat[field]).resolve()
            # a file inside the run dir (a budget's row map) is the run dir's, wherever the run dir has moved
            flat[field] = f"RUN_DIR/{path.relative_to(run_dir)}" if path.is_relative_to(run_dir) else str(path)
    return {k: v for k, v in flat.items() if k not in RESUME_MAY_CHANGE}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("overrides", "table_bits"):  # dict-valued fields compare whole
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings written under a dataclass's fields (Python keeps them only in the source)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def describe_fields(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted path, current value, docstring)`` of every leaf field of a nested config, in declaration order
    (what ``--set`` accepts)."""
    out = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(describe_fields(value, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", value, docs.get(f.name, "")))
    return out


def validate(cfg: Any) -> None:
    """Run every nested section's checks (``__post_init__``), innermost first, then ``cfg``'s own."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()


def apply_override(cfg: Any, dotted: str, *, check: bool = True) -> None:
    """Set ``a.b.c=value`` on nested dataclasses, parsing ``value`` by the field's current type. With ``check``
    the changed section is validated at once; without, call ``validate`` after the last override (fields that must
    agree, like ``model.embedding_dim`` and the last of ``model.dense_arch``, can then change together)."""
    if "=" not in dotted:
        raise ValueError(f"override {dotted!r} must look like field.path=value")
    path, raw = dotted.split("=", 1)
    *parents, leaf = path.split(".")
    obj = cfg
    for p in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ValueError(f"override {dotted!r}: no config section {p!r}")
        obj = getattr(obj, p)
    names = {f.name for f in dataclasses.fields(obj)}
    if leaf not in names:
        raise ValueError(f"override {dotted!r}: {type(obj).__name__} has no field {leaf!r} (fields: {sorted(names)})")
    current = getattr(obj, leaf)
    if dataclasses.is_dataclass(current):
        fields = ", ".join(f.name for f in dataclasses.fields(current))
        raise ValueError(f"override {dotted!r}: {path} is a config section; set its fields, {path}.FIELD=VALUE "
                         f"(fields: {fields})")
    value_type = typing.get_type_hints(type(obj)).get(leaf)
    value = _parse_like(current, raw, dotted, typing.get_args(value_type)[1:2] if isinstance(current, dict) else ())
    if dataclasses.is_dataclass(obj) and getattr(type(obj), "__dataclass_params__").frozen:
        raise ValueError(f"override {dotted!r}: {type(obj).__name__} is frozen; set the whole section in a named config")
    setattr(obj, leaf, value)
    if check and hasattr(obj, "__post_init__"):
        obj.__post_init__()


_DICT_ITEM = re.compile(r",(?=[A-Za-z_][\w.]*:)")  # a comma that starts the next ``name:`` (values may hold commas)


def _parse_like(current: Any, raw: str, where: str, dict_value: tuple = ()) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            return tuple(int(x) for x in raw.split(",") if x)
        if isinstance(current, dict):  # name:value,name:value (a value may itself hold ':' and ',')
            convert = dict_value[0] if dict_value and dict_value[0] in (int, float) else str
            out = {}
            for item in _DICT_ITEM.split(raw.rstrip(",")):
                if item:
                    if ":" not in item:
                        raise ValueError(f"{item!r} is not name:value")
                    key, value = item.split(":", 1)
                    out[key] = convert(value)
            return out
        return raw
    except ValueError as e:
        raise ValueError(f"override {where!r}: cannot parse {raw!r} as {type(current).__name__} ({e})") from None
