"""The byte budget's choice (``quant.budget``): exact against brute force, within the budget, bytes as FBGEMM lays
them out."""

from __future__ import annotations

import dataclasses
import itertools
import types

import numpy as np
import pytest

from dqrm.quant.budget import PRIOR_LOSS, Option, bit_choices, choose, cost, lookups_lost, option_bytes, table_bytes
from dqrm.quant.convert import RowLayout
from dqrm.quant.spec import QuantSpec


def _random_options(rng: np.random.Generator, tables: int) -> list[list[Option]]:
    out = []
    for _ in range(tables):
        opts = []
        for _ in range(int(rng.integers(1, 5))):
            opts.append(Option(bits=8, min_count=0, rows=1, bytes=int(rng.integers(100, 5000)),
                               damage=float(rng.uniform(-0.01, 0.1)), prior=float(rng.uniform(0, 1))))
        out.append(opts)
    return out


def _brute_force(options: list[list[Option]], budget: int, noise: float) -> float:
    best = np.inf
    for combo in itertools.product(*options):
        if sum(o.bytes for o in combo) <= budget:
            best = min(best, sum((o.damage if o.damage > noise else 0.0) + PRIOR_LOSS * o.prior for o in combo))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_choice_is_the_least_damage_that_fits(seed):
    rng = np.random.default_rng(seed)
    options = _random_options(rng, 5)
    smallest, largest = (sum(f(o.bytes for o in opts) for opts in options) for f in (min, max))
    budget = int(rng.integers(smallest, largest + 1))
    # bytes counted in units of budget / resolution, rounded up: a fine resolution loses nothing on these sizes
    noise = float(rng.choice([0.0, 0.02]))
    chosen = choose(options, budget, noise, resolution=budget)
    assert sum(o.bytes for o in chosen) <= budget
    assert [o in opts for o, opts in zip(chosen, options)] == [True] * 5
    assert sum(cost(o, noise) for o in chosen) == pytest.approx(_brute_force(options, budget, noise), abs=1e-9)
    # a coarse resolution still never exceeds the budget
    assert sum(o.bytes for o in choose(options, budget, resolution=50)) <= budget


def test_bytes_are_only_given_up_for_a_reason():
    # damages of zero (or measured gains) everywhere: with room for every largest option, the largest are chosen
    options = [[Option(8, 0, 1, 1000, 0.0), Option(4, 0, 1, 600, -0.02), Option(2, 0, 1, 400, 0.0)]
               for _ in range(3)]
    assert [o.bits for o in choose(options, 3000)] == [8, 8, 8]
    # 2200 bytes: one table must give up precision; two at INT4 (2200 bytes) beat INT4 + INT2 (2000)
    assert sorted(o.bits for o in choose(options, 2200)) == [4, 4, 8]


def test_within_the_noise_rows_are_kept_where_lookups_are():
    # two tables of 1000 rows; in "hot" 10 rows take 90 % of its lookups, in "flat" every row is looked up alike
    hot = np.r_[np.full(10, 90.0), np.full(990, 100 / 990)]
    flat = np.full(1000, 1.0)
    total = int(hot.sum() + flat.sum())
    assert lookups_lost(flat, total, 8, 2) == pytest.approx(0.5)  # every flat row seen once: all its lookups lost
    assert lookups_lost(hot, total, 8, 2) == pytest.approx(0.05 + 0.45 * 4.0 ** -8)  # the 990 rare ones lost
    assert lookups_lost(hot, total, 4, 0) == pytest.approx(0.5 * 4.0 ** -4)
    # the whole tables measure nothing; dropping the rare rows measures +1e-5 in "hot" (chance), 0 in "flat"
    options = [[Option(8, 0, 1000, 1000, 0.0, lookups_lost(counts, total, 8, 0)),
                Option(8, 2, 11, 60, damage, lookups_lost(counts, total, 8, 2))]
               for counts, damage in ((hot, 1e-5), (flat, 0.0))]
    # room for one whole table: within the noise (1e-5), so the hot table gives up its rare rows, not the flat one
    chosen = choose(options, 1060, noise=1e-5)
    assert [o.min_count for o in chosen] == [2, 0]
    # a damage within the noise counts as none, however large the noise
    options[0][1] = dataclasses.replace(options[0][1], damage=0.008)
    assert [o.min_count for o in choose(options, 1060, noise=0.01)] == [2, 0]
    # a damage above the noise outweighs the prior
    options[0][1] = dataclasses.replace(options[0][1], damage=0.01)
    assert [o.min_count for o in choose(options, 1060, noise=1e-5)] == [0, 2]


def test_a_budget_below_the_smallest_options_is_refused():
    options = [[Option(8, 0, 1, 1000, 0.0), Option(2, 0, 1, 400, 0.5)] for _ in range(3)]
    with pytest.raises(ValueError, match="smallest options take 1,200"):
        choose(options, 1199)


@pytest.mark.parametrize("row_alignment", [1, 16])
def test_option_bytes_cover_fbgemm_layout(row_alignment):
    tables = [("a", 1000, 16, 4), ("b", 37, 16, 2), ("c", 5000, 16, 8), ("d", 3, 64, 4)]
    spec = QuantSpec(table_bits={n: b for n, _, _, b in tables}, row_alignment=row_alignment)
    layout = RowLayout.of([types.SimpleNamespace(name=n, num_embeddings=r, embedding_dim=d) for n, r, d, _ in tables],
                          spec)
    ours = sum(table_bytes(r, d, b, row_alignment) for _, r, d, b in tables)
    # the joint buffer starts each table on 128 bytes; the last table's end is not padded
    assert layout.total_bytes <= ours < layout.total_bytes + 128
    for t in layout.tables:
        assert table_bytes(t.rows, t.dim, t.bits, row_alignment) >= t.rows * t.row_bytes
    # a kept table: kept + 1 rows, and 4 bytes of map per kept row
    assert option_bytes(1000, 100, 16, 4, 1) == table_bytes(101, 16, 4, 1) + 400
    assert option_bytes(1000, None, 16, 4, 1) == table_bytes(1000, 16, 4, 1)
    assert table_bytes(1000, 16, 4, 1) == 12_032  # 1000 rows of fp16 scale, bias and 8 code bytes, to 128 bytes


def test_bit_choices_keep_rows_whole_bytes():
    assert bit_choices(16) == [8, 4, 2]
    assert bit_choices(2) == [8, 4]
