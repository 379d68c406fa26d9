"""The straight-through estimator of embedding QAT: a TBE's pooled output plus ``pool(FQ(W_touched) - W_touched)``.

Pooling is linear, so ``pool(FQ(W)) = pool(W) + pool(FQ(W_touched) - W_touched)``. ``EmbeddingSTE.corrected``
computes the second term without gradient from the rows the TBE owns and adds it to the TBE's output; the TBE's own
backward (and its fused optimizer) then applies exactly the straight-through gradient to the FP32 master rows. The
cost depends on the batch, not on the table size, and nothing of the table is copied. The grid (``alpha``, the bits
per table) is the caller's, ``quant.embedding_qat.EmbeddingFakeQuantizer``'s buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from dqrm.quant import qat_kernels
from dqrm.quant.fake_quant import rowwise_qparams, symmetric_qparams
from dqrm.quant.row_maxima import RowMaxima
from dqrm.sharding.tbe import TBELayout

_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


class EmbeddingSTE:
    """The fake-quant correction of each layout's TBE output, on the table grid (``alpha``: ``max|W|`` per table) or
    the row grid; the rows it pools are marked in ``row_maxima``'s seen rows (for the next scale refresh)."""

    def __init__(self, layouts: list[TBELayout], global_index: list[torch.Tensor], granularity: str,
                 row_maxima: RowMaxima) -> None:
        self.layouts, self.global_index, self.granularity = layouts, global_index, granularity
        self.row_maxima = row_maxima
        self.compiled = True
        """On CPU with the table grid, compute the correction in one compiled call (same bits as the torch ops)."""
        self._grid_cache: dict = {}
        self._static_cache: dict = {}

    def corrected(self, i: int, kwargs: dict, output: torch.Tensor, alpha: torch.Tensor,
                  table_bits: torch.Tensor) -> torch.Tensor:
        """Layout ``i``'s TBE output plus the fake-quant correction of the rows it pooled (``kwargs``: the TBE's
        indices, offsets and per-sample weights): ``output`` itself, written in place, on the compiled CPU path;
        ``output + correction`` otherwise. Either way its gradient is the TBE's (straight through)."""
        self._check_uniform_batch(i, kwargs, output)
        corr = self._correction(i, kwargs, output, alpha, table_bits)
        return output if corr is None else output + corr

    def _check_uniform_batch(self, i: int, kwargs: dict, output: torch.Tensor) -> None:
        """The correction finds each id's feature from one batch size for every feature (``offsets`` holds
        features x batch bags): a variable-batch KJT would pool deltas into the wrong bags, so it is refused."""
        features = self.layouts[i].feature_table_map.numel()
        bags = kwargs["offsets"].numel() - 1
        if kwargs.get("batch_size_per_feature_per_rank") is not None or bags != features * output.shape[0]:
            raise NotImplementedError(
                f"embedding QAT needs one batch size for every feature, but the TBE of "
                f"{self.layouts[i].table_names} got {bags} bags for {features} features and {output.shape[0]} "
                f"output rows (a variable-batch KeyedJaggedTensor); give every feature the same batch size (the "
                f"dqrm reader does)")

    def _table_grid(self, i: int, dev: torch.device, alpha: torch.Tensor,
                    table_bits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per local table of layout ``i``: (scale, 1/scale, bias, qmax), recomputed only when the scales change."""
        # Tensor version counters change on every in-place write (update_scales, load_state_dict).
        version = (alpha._version, table_bits._version)
        key = (i, dev, version)
        if key not in self._grid_cache:
            g = self.global_index[i].to(dev)
            bits = table_bits.to(dev)[g]
            scale, bias = symmetric_qparams(alpha.to(dev)[g], bits)
            qmax = (2 ** bits - 1).to(torch.float32)
            self._grid_cache = {k: v for k, v in self._grid_cache.items() if k[2] == version}
            self._grid_cache[key] = (scale, 1.0 / scale, bias, qmax)
        return self._grid_cache[key]

    def _static(self, i: int, dev: torch.device, table_bits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layout tensors of layout ``i`` on ``dev`` (made once)."""
        key = (i, dev)
        if key not in self._static_cache:
            lay = self.layouts[i]
            g = self.global_index[i].to(dev)
            self._static_cache[key] = {
                "ftm": lay.feature_table_map.to(dev), "col0": lay.feature_dim_offsets.to(dev),
                "w_off": lay.weights_offsets().to(dev, torch.long),
                "dims": torch.tensor(lay.local_dims, device=dev),
                "qmax": (2 ** table_bits.to(dev)[g] - 1).to(torch.float32),
            }
        return self._static_cache[key]

    def _per_feature(self, i: int, dev: torch.device, alpha: torch.Tensor,
                     table_bits: torch.Tensor) -> torch.Tensor:
        """(features, 4): bias, 1/scale, scale and qmax of each feature's table grid (``table`` granularity)."""
        version = (alpha._version, table_bits._version)
        key = ("feature", i, dev, version)
        if key not in self._grid_cache:
            scale, inv, bias, qmax = self._table_grid(i, dev, alpha, table_bits)
            ftm = self._static(i, dev, table_bits)["ftm"]
            self._grid_cache[key] = torch.stack([bias, inv, scale, qmax], dim=1)[ftm].contiguous()
        return self._grid_cache[key]

    def _arange(self, n: int, dev: torch.device) -> torch.Tensor:
        have = self._static_cache.get(("arange", dev))
        if have is None or have.numel() < n:
            have = torch.arange(max(n, 2 * (0 if have is None else have.numel()), 1024), device=dev)
            self._static_cache[("arange", dev)] = have
        return have[:n]

    @torch.no_grad()
    def _correction(self, i: int, kwargs: dict, output: torch.Tensor, alpha: torch.Tensor,
                    table_bits: torch.Tensor) -> torch.Tensor | None:
        """``pool(FQ(W_touched) - W_touched)`` in the TBE's output layout (features side by side per sample), or
        ``None`` where it was added to ``output`` in place."""
        if len(set(self.layouts[i].local_dims)) == 1:
            return self._correction_uniform(i, kwargs, output, alpha, table_bits)
        return self._correction_mixed(i, kwargs, output, alpha, table_bits)

    def _correction_uniform(self, i: int, kwargs: dict, output: torch.Tensor, alpha: torch.Tensor,
                            table_bits: torch.Tensor) -> torch.Tensor | None:
        """All tables of the TBE have one width ``d``: few, large tensor ops (the per-step cost is op dispatch).
        Rows come from a (rows, d) view of the flat buffer; each index's grid is its feature's; the deltas are
        pooled per bag by ``embedding_bag`` over the TBE's own offsets (bags are feature-major)."""
        lay, dev = self.layouts[i], output.device
        d = lay.local_dims[0]
        flat = lay.flat_weights()
        psw = kwargs.get("per_sample_weights")
        if self.compiled and self.granularity == "table" and dev.type == "cpu" and \
                flat.dtype == output.dtype == torch.float32 and output.is_contiguous() \
                and (psw is None or psw.dtype == torch.float32):
            # One compiled call, the same bits as the torch ops below (quant.qat_kernels), adding the correction to
            # the TBE's output in place: no autograd op (its gradient is the identity, the STE), and nothing
            # allocated. The TBE's backward does not read its output, and the write does not bump its version.
            seen = self.row_maxima.seen.get(i)
            qat_kernels.embedding_correction(
                kwargs["indices"].numpy(), kwargs["offsets"].numpy(), flat.detach().view(-1, d).numpy(),
                lay.first_rows(dev).numpy(), self._per_feature(i, dev, alpha, table_bits).numpy(),
                _EMPTY_F32 if psw is None else psw.detach().numpy(), _EMPTY_U8 if seen is None else seen.numpy(),
                output.detach().view(output.shape[0], -1).numpy())
            return None
        st = self._static(i, dev, table_bits)
        indices, offsets = kwargs["indices"].long(), kwargs["offsets"].long()
        features = st["ftm"].numel()
        batch = (offsets.numel() - 1) // features
        n = indices.numel()
        counts = offsets[::batch].diff()
        rows_at = lay.row_ids(indices, offsets)
        if i in self.row_maxima.seen:
            self.row_maxima.mark_seen(i, rows_at)
        rows = flat.view(-1, d).index_select(0, rows_at)
        if self.granularity == "table":
            grid = torch.repeat_interleave(self._per_feature(i, dev, alpha, table_bits), counts, dim=0, output_size=n)
            bias, inv, scale, qmax = grid[:, 0:1], grid[:, 1:2], grid[:, 2:3], grid[:, 3:4]
        else:
            bits = torch.repeat_interleave(table_bits.to(dev)[self.global_index[i].to(dev)][st["ftm"]], counts,
                                           output_size=n)
            scale, bias = rowwise_qparams(rows, bits)
            inv, qmax = 1.0 / scale, (2 ** bits - 1).to(torch.float32).unsqueeze(1)
        # FBGEMM's arithmetic, in place: code = clamp(round((w - bias) / scale)), value = scale * code + bias.
        delta = (rows - bias).mul_(inv).round_().clamp_(min=0)
        delta = torch.minimum(delta, qmax, out=delta).mul_(scale).add_(bias).sub_(rows)
        if psw is not None:
            delta.mul_(psw.unsqueeze(1))
        pooled = torch.nn.functional.embedding_bag(self._arange(n, dev), delta.to(output.dtype), offsets,
                                                   mode="sum", include_last_offset=True)
        return pooled.view(features, batch, d).transpose(0, 1).reshape(output.shape)

    def _correction_mixed(self, i: int, kwargs: dict, output: torch.Tensor, alpha: torch.Tensor,
                          table_bits: torch.Tensor) -> torch.Tensor:
        """Tables of several widths in one TBE (column-wise shards): per width, scattered into the output."""
        lay, dev = self.layouts[i], output.device
        st = self._static(i, dev, table_bits)
        indices, offsets = kwargs["indices"].long(), kwargs["offsets"].long()
        psw = kwargs.get("per_sample_weights")
        num_features = st["ftm"].numel()
        batch = (offsets.numel() - 1) // num_features
        bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=dev), offsets.diff())
        feature = bag // batch
        table = st["ftm"][feature]
        flat = lay.flat_weights()
        corr = torch.zeros_like(output)
        for d in sorted(set(lay.local_dims)):  # several widths: _correction sends one width to the uniform path
            sel = (st["dims"][table] == d).nonzero().squeeze(1)
            t_sel, idx_sel = table[sel], indices[sel]
            rows = flat[(st["w_off"][t_sel] + idx_sel * d).unsqueeze(1) + torch.arange(d, device=dev)]
            if self.granularity == "table":
                scale, inv, bias, qmax = (x[t_sel].unsqueeze(1) for x in self._table_grid(i, dev, alpha, table_bits))
            else:
                scale, bias = rowwise_qparams(rows, table_bits.to(dev)[self.global_index[i].to(dev)[t_sel]])
                inv, qmax = 1.0 / scale, st["qmax"][t_sel].unsqueeze(1)
            # FBGEMM's arithmetic, in place: code = clamp(round((w - bias) / scale)), value = scale * code + bias.
            delta = (rows - bias).mul_(inv).round_().clamp_(min=0)
            delta = torch.minimum(delta, qmax, out=delta).mul_(scale).add_(bias).sub_(rows)
            if psw is not None:
                delta.mul_(psw[sel].unsqueeze(1))
            f_sel, sample = feature[sel], bag[sel] % batch
            pos = (sample * output.shape[1] + st["col0"][f_sel]).unsqueeze(1) + torch.arange(d, device=dev)
            corr.view(-1).index_add_(0, pos.reshape(-1), delta.reshape(-1).to(corr.dtype))
        return corr
