"""Training-step time of compressed gradient communication on emulated links (``bench.links``: one network namespace
per rank, each joined to a switch by its own rate-limited full-duplex link), against the link speed.

Per link rate, the ranks train ``bench.comm``'s variants side by side (same model, batches and rounds; the ratio to
the uncompressed step is the median per-round ratio with a bootstrap 95% interval), for the default model with every
table data-parallel and the Kaggle-shaped model under its job's plan. The rate each link really delivers (one TCP
stream between two ranks) is measured and reported next to the configured one: these 2 cores cannot emulate links
much faster than about 10 Gbit/s, so "unlimited" and 25 Gbit/s are what the cores allow, not 25 Gbit/s.

The crossover: each variant's step time is fitted as ``a + b / rate`` (compute plus bytes over the link; least
squares over the measured rates), and the link speed below which a variant's step is faster than the uncompressed
one is where the two fits cross.

Needs root (network namespaces, tc); says so and stops otherwise. Writes ``comm_links.{json,txt,png}``
(``comm_links_w<W>.*`` at another world size).

    sudo python -m bench.comm_links [--rates unlimited,25,10,1] [--models default,kaggle] [--steps 10,300]
        [--world-size W] [--variants "fully compressed; ..."]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import comm
from bench.common import Report, add_out_argument, result_dir, save, table
from bench.links import Links, unavailable
from dqrm.sharding.comm import CommConfig
from tests.dist_utils import run_distributed

BASE = "uncompressed"
FULL = "fully compressed"
QCOMMS = ("qcomms INT8", f"{FULL} + qcomms INT8")
VARIANTS = {
    BASE: CommConfig(),
    "touched FP32": CommConfig(dp_tables="touched"),
    "touched INT8": CommConfig(dp_tables="touched_int8"),
    QCOMMS[0]: CommConfig(qcomms="int8"),
    FULL: CommConfig(dp_tables="touched_int8", dense="int8_ef"),
    QCOMMS[1]: CommConfig(dp_tables="touched_int8", dense="int8_ef", qcomms="int8"),
    f"{FULL}, MLP by INT8 reduce-scatter": CommConfig(dp_tables="touched_int8", dense="int8_rs_ag"),
}
"""Fully compressed: touched rows in INT8 for the data-parallel tables, INT8 with error feedback for the MLPs; the
model-parallel all-to-alls stay FP32 unless qcomms is named (the default model has none: its qcomms variants are
not run). The last variant sends the MLP gradients by the INT8 reduce-scatter and all-gather
(``sharding.int8_allreduce``) instead of the INT8 all-gather: the same bytes at two ranks, fewer from three on."""


def variants_for(model: str, names: list[str] | None) -> dict[str, CommConfig]:
    chosen = {k: v for k, v in VARIANTS.items() if names is None or k in names or k == BASE}
    if model == "default":  # every table data-parallel: no all-to-all for qcomms to compress
        chosen = {k: v for k, v in chosen.items() if k not in QCOMMS}
    return chosen


def parse_rate(text: str) -> float | None:
    return None if text == "unlimited" else float(text)


def fit(rates: list[float], times: list[float]) -> tuple[float, float]:
    """``(a, b)`` of ``time = a + b / rate`` by least squares (rates in Gbit/s, as measured)."""
    x = np.stack([np.ones(len(rates)), 1 / np.asarray(rates)], axis=1)
    (a, b), *_ = np.linalg.lstsq(x, np.asarray(times), rcond=None)
    return float(a), float(b)


def crossover(base: tuple[float, float], other: tuple[float, float]) -> dict:
    """Where ``other``'s fitted step is shorter than ``base``'s: ``{"faster": "always" | "never" | "below" |
    "above", "gbit": the crossing rate for "below" / "above", else None}``."""
    (a0, b0), (a1, b1) = base, other
    if b1 < b0 and a1 <= a0:
        return {"faster": "always", "gbit": None}
    if b1 >= b0 and a1 >= a0:
        return {"faster": "never", "gbit": None}
    # the lines cross once: fewer seconds per byte over the link but more compute (faster on slow links), or the
    # other way round (faster on fast links)
    return {"faster": "below" if b1 < b0 else "above", "gbit": (b0 - b1) / (a1 - a0)}


def describe(x: dict) -> str:
    """``crossover``'s answer in words."""
    if x["faster"] in ("below", "above"):
        return f"faster {x['faster']} {x['gbit']:.1f} Gbit/s"
    return {"always": "faster at every link speed", "never": "never faster"}[x["faster"]]


def measured_verdict(rows: list[dict]) -> str:
    """Per link, what the paired ratios show: faster or slower where the 95% interval of the median ratio excludes
    1, else not resolved."""
    out = []
    for r in rows:
        lo, hi = r["ratio_ci95"]
        out.append(f"{r['link']}: {'faster' if hi < 1 else 'slower' if lo > 1 else 'not resolved'}")
    return ", ".join(out)


PAPER_WORLD_SIZES = (2, 8, 64)
PAPER_RATES = (1, 10, 25, 100)


def codec_seconds(config_name: str, repeats: int = 20) -> dict[str, float]:
    """Median seconds of the compiled INT8 codec (``sharding.int8_codec``) on one rank for the config's MLP
    gradients (one bucket): encoding them, and decoding one rank's copy of them."""
    import time

    import torch

    from dqrm.pipeline.budget import mlp_layers
    from dqrm.pipeline.configs import get_config
    from dqrm.sharding import int8_codec
    from dqrm.sharding.ddp_hooks import _Int8Bucket

    params = [p for i, o in mlp_layers(get_config(config_name)) for p in torch.nn.Linear(i, o).parameters()]
    n = sum(p.numel() for p in params)
    bucket = _Int8Bucket(params, n, 1, torch.device("cpu"))  # the hook's own row layout of such a bucket
    segments, first = bucket.segment_array, bucket.rows
    rng = np.random.default_rng(0)
    grad, err = rng.standard_normal(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    steps, codes, out = np.empty(first, np.float32), np.empty(n, np.int8), np.empty(n, np.float32)
    tiny = np.float32(np.finfo(np.float32).tiny)
    enc, dec = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        int8_codec.encode(grad, err, segments, steps, codes, tiny)
        t1 = time.perf_counter()
        int8_codec.decode(codes[None], steps[None], segments, out)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    return {"values": n, "rows": first, "encode_s": float(np.median(enc[1:])), "decode_s": float(np.median(dec[1:]))}


def paper_model(codec: dict[str, float]) -> list[dict]:
    """MLP gradient exchange per step at world sizes and link rates not run here: wire bytes per rank by the
    formulas (``sharding.byte_counter``) over the link, plus the measured codec, not overlapped (an upper bound on
    the exchange's own time). FP32 ring all-reduce; INT8 all-gather (encode once, decode every rank's copy); INT8
    reduce-scatter + all-gather (encode, decode and sum W chunks of n/W, re-encode 1/W, decode the gathered n)."""
    from dqrm.sharding.byte_counter import all_gather_wire_bytes, all_reduce_wire_bytes

    n, rows, enc, dec = codec["values"], codec["rows"], codec["encode_s"], codec["decode_s"]
    payload = n + 4 * rows
    rows_out = []
    for w in PAPER_WORLD_SIZES:
        ways = {"FP32 ring all-reduce": (all_reduce_wire_bytes(4 * n, w), 0.0),
                "INT8 all-gather": (all_gather_wire_bytes(payload, w), enc + w * dec),
                "INT8 reduce-scatter + all-gather": (all_reduce_wire_bytes(payload, w), enc + dec + enc / w + dec)}
        for name, (wire, codec_s) in ways.items():
            rows_out.append({"world_size": w, "exchange": name, "wire_bytes": wire, "codec_ms": 1e3 * codec_s,
                             **{f"ms_at_{r}g": 1e3 * (wire * 8 / (r * 1e9) + codec_s) for r in PAPER_RATES}})
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="unlimited,25,10,1", help="link rates in Gbit/s, comma-separated; "
                   "'unlimited' for links without a rate limit")
    p.add_argument("--models", default="default,kaggle", help="named configs giving the model shape and batch")
    p.add_argument("--steps", default="10,300", help="timed rounds per model: one number or one per model")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--variants", default=None, help=f"';'-separated subset of: {'; '.join(VARIANTS)} "
                   f"({BASE} always runs)")
    add_out_argument(p, restricted_default=True)
    args = p.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"bench.comm_links: {reason}")
    rates = [parse_rate(r) for r in args.rates.split(",")]
    models = args.models.split(",")
    steps = [int(x) for x in args.steps.split(",")]
    steps = steps * len(models) if len(steps) == 1 else steps
    if len(steps) != len(models):
        p.error(f"--steps gives {len(steps)} counts for {len(models)} models")
    names = [v.strip() for v in args.variants.split(";")] if args.variants else None
    unknown = sorted(set(names or ()) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from: {'; '.join(VARIANTS)}")
    name = "comm_links" if args.world_size == 2 else f"comm_links_w{args.world_size}"
    restricted = [o for o, default in (("--rates", "unlimited,25,10,1"), ("--models", "default,kaggle"),
                                       ("--steps", "10,300"), ("--world-size", 2), ("--variants", None))
                  if getattr(args, o[2:].replace("-", "_")) != default]
    out = result_dir(args.out, restricted)

    rows, links = [], []
    for rate in rates:
        with Links(args.world_size, rate) as net:
            measured = net.measure_rate()
            links.append({"configured_gbit": rate, "measured_gbit": measured})
            print(f"link {rate or 'unlimited'} Gbit/s: one TCP stream gets {measured:.2f} Gbit/s", flush=True)
            for model, n in zip(models, steps):
                res = run_distributed(comm._worker, model, n, variants_for(model, names),
                                      world_size=args.world_size, links=net)[0]
                for r in comm.result_rows(model, res):
                    rows.append({"link": "unlimited" if rate is None else f"{rate:g}", "configured_gbit": rate,
                                 "measured_gbit": measured, **r})
                    print(f"  {model:<8} {r['variant']:<32} {r['step_ms']:8.1f} ms  x{r['time_vs_dense']:.3f}",
                          flush=True)

    crossings = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        fits = {}
        for v in dict.fromkeys(r["variant"] for r in mine):
            pts = [r for r in mine if r["variant"] == v]
            fits[v] = fit([r["measured_gbit"] for r in pts], [r["step_ms"] for r in pts])
        crossings[model] = {v: {"a_ms": f[0], "b_ms_gbit": f[1], "crossover": crossover(fits[BASE], f)}
                            for v, f in fits.items() if v != BASE}

    report = Report()
    report(f"world size {args.world_size}, each rank on its own emulated link (bench.links: veth to a switch, tbf "
           f"on both ends); rounds per model: {', '.join(f'{m} {n}' for m, n in zip(models, steps))}; time/base: "
           f"median per-round ratio to the {BASE} step, 95% interval of that median")
    report("links: " + "; ".join(f"{link['configured_gbit'] or 'unlimited'} Gbit/s configured, "
                                 f"{link['measured_gbit']:.2f} measured" for link in links))
    for r in rows:
        r["ci95_text"] = f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]"
    report(table(rows, [("link", "Gbit/s", "s"), ("measured_gbit", "measured", ".2f"), ("model", "model", "s"),
                        ("variant", "variant", "s"), ("bytes_per_step", "wire B/step", ",.0f"),
                        ("step_ms", "ms/step", ".1f"), ("time_vs_dense", "time/base", ".3f"),
                        ("ci95_text", "95% interval", "s")]))
    for model, c in crossings.items():
        for v, f in c.items():
            pts = [r for r in rows if r["model"] == model and r["variant"] == v]
            report(f"{model}: {v}: fit step = {f['a_ms']:.1f} ms + {f['b_ms_gbit']:.1f} ms x (1 Gbit/s / rate), "
                   f"{describe(f['crossover'])}; measured per link (95% interval vs 1): {measured_verdict(pts)}")
    codec = codec_seconds("kaggle")
    paper = paper_model(codec)
    report(f"on paper, the Kaggle-shaped model's MLP gradients ({codec['values']:,} values, {codec['rows']:,} rows; "
           f"codec measured here: encode {1e3 * codec['encode_s']:.2f} ms, decode of one rank's copy "
           f"{1e3 * codec['decode_s']:.2f} ms), exchange time = wire bytes / rate + codec, not overlapped:")
    report(table(paper, [("world_size", "W", "d"), ("exchange", "exchange", "s"), ("wire_bytes", "wire B/rank", ",.0f"),
                         ("codec_ms", "codec ms", ".2f"), *((f"ms_at_{r}g", f"ms at {r} Gbit/s", ".2f")
                                                            for r in PAPER_RATES)]))
    payload = {"world_size": args.world_size, "steps": dict(zip(models, steps)), "links": links, "rows": rows,
               "fits": crossings, "codec": codec, "paper_model": paper}
    print(f"json: {save(name, payload, report.text, out=out)}")
    plot(rows, models, out / f"{name}.png")


def plot(rows: list[dict], models: list[str], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for v in dict.fromkeys(r["variant"] for r in mine):
            pts = sorted((r["measured_gbit"], r["step_ms"]) for r in mine if r["variant"] == v)
            ax.plot(*zip(*pts), marker="o", label=v)
        ax.set_xscale("log")
        ax.set_xlabel("link rate, Gbit/s (as measured)")
        ax.set_ylabel("median step, ms")
        ax.set_title(f"{model} model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
