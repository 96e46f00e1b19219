"""The row core: nested partition levels laid out as padded rows, for the fixed hierarchies.

DS grids, DR and DP bins and the whole image share a structure that the general segment
core (:mod:`hdn._core.segments`) does not exploit: every level is a *partition* of the same
member pixels, and each context of level ``l`` is the union of consecutive contexts of the
finest level. A :class:`RowLayout` copies the batch once into a ``(S, C)`` array, one
padded row per finest context (image-major; DS cells in quadtree order, DR/DP bins in
depth order); then the contexts of level ``l`` are simply the rows of the *view*
``(S / g_l, g_l * C)``, with ``g_l`` finest contexts per row. Every per-context statistic
is a row reduction and every broadcast a view, and the loss of a member pixel is the mean
of its ``L`` per-level losses.

DR and DP bins are runs of each image's pixels in depth order (the order the contexts
sorted the target in), so their layout is a window of that order per row, and the target
laid out is copied from the sorted depths.

Medians are row selections. On CPU they run in NumPy's introselect
(:func:`numpy.partition`, several times faster than :func:`torch.median` along a
dimension), every level of a call in one round of two threads, each selection's rows
halved between them; elsewhere in :func:`torch.kthvalue`. A row whose members do not fill
it gets ``-inf`` and ``+inf`` in its other entries, so many that the lower median of the
members sits at the same column ``(width - 1) // 2`` of every row: one selection serves
rows of any member count. Before a selection those entries are spread into distinct
values on the same sides, since introselect slows down tenfold on rows made mostly of one
repeated value. The target's median column is searched only when its gradient is wanted.

:class:`RowHierarchicalSSI` is the loss (forward and an analytic backward, the same
derivation as :func:`hdn._core.segments._normalization_backward`). Between forward and backward
it keeps the laid-out prediction (and the target where its gradient is wanted), an int8
sign per level and per-row statistics (the sums the backward needs of the signs, so that
it passes over the rows twice per level): memory grows with pixels x levels, not with the
number of contexts. Two scratch buffers per thread are kept from call to call on CPU
(:func:`clear_workspace` releases them).
"""
from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from hdn._core.segments import EPS

_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0
_MAX_PERMUTED_BITS = 11  # 2 * 11 + 3 = 25 dimensions, the most a permuted copy takes


class RowLayout:
    """A batch laid out as padded rows, one per finest context, with nested coarser levels.

    Subclasses implement the methods below and set:

    Attributes:
        member: ``(S, C)`` bool, True where the entry is a pixel of its row's context.
        length: ``(S,)`` members per row.
        num_valid: the number of valid pixels (the loss's denominator; pixels in no row
            count too).
        groups: per level (level 0 first), the number of consecutive rows that form one
            context of that level; ``S`` is divisible by each.
        num_pixels: ``N = B * H * W``.
        batch: ``B``; rows are image-major, ``S / B`` per image.
    """

    member: Tensor
    length: Tensor
    num_valid: int
    groups: list[int]
    num_pixels: int
    batch: int

    def gather_pair(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(N,)`` finite prediction and target -> both laid out ``(S, C)``."""
        raise NotImplementedError

    def centring_mask(self, dtype: torch.dtype) -> Tensor | None:  # pragma: no cover - abstract
        """The float member mask that zeroes entries outside the members, or ``None`` where
        those entries are infinite in laid-out tensors (see :func:`_centered`)."""
        raise NotImplementedError

    def level_medians(
        self, P: Tensor, G: Tensor, counts: list[Tensor], work: _Workspace, target_column: bool = True
    ) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor | None]]]:  # pragma: no cover - abstract
        """Per level, the members' lower medians of the laid-out prediction and target in the
        rows of that level's view, and columns where they stand (the target's ``None``
        unless ``target_column``: only its gradient needs it). ``counts``: members per row
        of each level's view. Rows without members get median 0."""
        raise NotImplementedError

    def per_pixel(self, grad: Tensor) -> Tensor:  # pragma: no cover - abstract
        """A laid-out gradient, flat ``(S * C + 1,)`` with a 0 at the end (0 outside members),
        as ``(N,)`` per pixel (0 for pixels in no row)."""
        raise NotImplementedError

    def laid_weights(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(N,)`` per-pixel weights laid out ``(S, C)``, 0 outside the members (the adjoint
        of :meth:`per_pixel` on the members)."""
        raise NotImplementedError


def _quadtree_order(cells: int) -> list[int]:
    """Row-major cell numbers ``r * cells + c`` of a ``cells x cells`` grid in quadtree order.

    The key interleaves the bits of ``r`` and ``c`` (``r``'s first, most significant level
    first), so the ``4**k`` cells of every coarser ``2**-k`` cell are consecutive."""
    bits = max(cells.bit_length() - 1, 0)

    def key(r: int, c: int) -> int:
        return sum((((r >> b) & 1) << (2 * b + 1)) | (((c >> b) & 1) << (2 * b)) for b in range(bits))

    return sorted(range(cells * cells), key=lambda z: key(z // cells, z % cells))


def _cell_axis(size: int, cells: int) -> tuple[list[int], list[bool], list[int], int]:
    """Padded positions along one axis: the bounds of docs/semantics.md §3 ``int(i * w * size)``, ``w = 1 / cells``.

    Returns the source index of every padded position (padding repeats the cell's last
    pixel), whether it is real, the padded position of every source index, and the padded
    cell length."""
    w = 1 / cells
    bounds = [int(i * w * size) for i in range(cells + 1)]
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    source, real, padded = [], [], [0] * size
    for i in range(cells):
        a, b = bounds[i], bounds[i + 1]
        for j in range(longest):
            source.append(a + min(j, b - a - 1))
            real.append(j < b - a)
            if j < b - a:
                padded[a + j] = i * longest + j
    return source, real, padded, longest


class GridLayout(RowLayout):
    """DS grids (and the whole image, ``levels = 1``): one row per finest cell.

    Finest cells are padded to the longest cell along each axis (the truncated bounds of docs/semantics.md §3
    make cells differ by at most one pixel per axis) and ordered as a quadtree, so a cell
    of level ``l`` is ``4**(L-1-l)`` consecutive rows. For image sizes divisible by
    ``2**(L-1)`` the layout is a pure permutation (no padding); for ``L = 1`` a view.

    Args:
        valid: ``(B, H, W)`` bool.
        levels: ``L`` with ``2**(L-1) <= min(H, W)``.
    """

    def __init__(self, valid: Tensor, levels: int):
        B, H, W = valid.shape
        self.shape = (B, H, W)
        self.num_pixels = B * H * W
        self.batch = B
        self.cells = cells = 2 ** (levels - 1)
        dev = valid.device
        rows, row_real, row_back, self.cell_h = _cell_axis(H, cells)
        cols, col_real, col_back, self.cell_w = _cell_axis(W, cells)

        def _index(values: list[int], identity: bool) -> Tensor | None:
            return None if identity else torch.tensor(values, dtype=torch.int64, device=dev)

        self._rows = _index(rows, len(rows) == H)
        self._cols = _index(cols, len(cols) == W)
        self._row_back = _index(row_back, len(rows) == H)
        self._col_back = _index(col_back, len(cols) == W)
        # Quadtree order: cell bits (r_f-1, c_f-1, ..., r_0, c_0), most significant first. A
        # permutation of the bit dimensions does it where the tensor's rank allows (2f + 3
        # dimensions), an index over the cells otherwise.
        f = levels - 1
        self._bits = f if f <= _MAX_PERMUTED_BITS else None
        rows_bits, col_bits = list(range(1, f + 1)), list(range(f + 2, 2 * f + 2))
        self._to_quadtree = [0, *[d for pair in zip(rows_bits, col_bits) for d in pair], f + 1, 2 * f + 2]
        self._from_quadtree = [self._to_quadtree.index(d) for d in range(2 * f + 3)]
        order = _quadtree_order(cells) if self._bits is None else list(range(cells * cells))
        self._order = _index(order, cells <= 2 or self._bits is not None)
        inverse = [0] * len(order)
        for i, z in enumerate(order):
            inverse[z] = i
        self._order_back = _index(inverse, cells <= 2 or self._bits is not None)
        self.groups = [4 ** (levels - 1 - lvl) for lvl in range(levels)]
        real = torch.tensor(row_real, device=dev).view(-1, 1) & torch.tensor(col_real, device=dev).view(1, -1)
        self.member = self._arrange(valid.reshape(B, H, W)) & self._arrange(real.expand(B, -1, -1), padded=True)
        self.length = torch.count_nonzero(self.member, dim=1)  # (a dtype= sum would copy the mask)
        self.num_valid = int(self.length.sum())  # every valid pixel is in one finest cell
        self._outside: _Outside | None = None
        self._bounds: list[tuple[float, float]] | None = None

    def gather_pair(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        G = self.gather(target)
        # non-finite targets are invalid; the layout is a copy unless it is a view (L = 1)
        G = torch.nan_to_num(G, 0.0, 0.0, 0.0) if G.data_ptr() == target.data_ptr() else G.nan_to_num_(0.0, 0.0, 0.0)
        return self.gather(pred), G

    def centring_mask(self, dtype: torch.dtype) -> Tensor:
        return self.member.to(dtype)

    def level_medians(self, P, G, counts, work, target_column=True):
        S = P.shape[0]
        if not _numpy_selects(P):
            return [
                tuple(row_lower_medians([P.view(S // g, -1), G.view(S // g, -1)], self.member.view(S // g, -1), n))
                for g, n in zip(self.groups, counts)
            ]
        if self._outside is None:
            self._outside = _Outside(self.member)
            # many entries outside the members (sparse ground truth): spread their fills
            if 8 * self._outside.positions.size > self.member.numel():
                self._bounds = [_extremes(x) for x in (P, G)]
        selections = []
        for group, n in zip(self.groups, counts):
            R = S // group
            selections += _member_selections([P.view(R, -1), G.view(R, -1)], n, self._outside, self._bounds, (True, target_column))
        picked = _run_selections(selections, work)
        return [_empty_to_zero(picked[2 * i : 2 * i + 2], n) for i, n in enumerate(counts)]

    def _arrange(self, x: Tensor, padded: bool = False) -> Tensor:
        """``(B, H, W)`` (or already padded ``(B, cells*cell_h, cells*cell_w)``) -> ``(S, C)``."""
        B = x.shape[0]
        if not padded:
            if self._rows is not None:
                x = x.index_select(1, self._rows)
            if self._cols is not None:
                x = x.index_select(2, self._cols)
        n, h, w = self.cells, self.cell_h, self.cell_w
        if self._bits is not None:  # quadtree order by a permutation of the cell-index bits
            f = self._bits
            x = x.reshape(B, *[2] * f, h, *[2] * f, w).permute(self._to_quadtree)
            return x.reshape(B * n * n, h * w)
        x = x.reshape(B, n, h, n, w).permute(0, 1, 3, 2, 4).reshape(B, n * n, h * w)
        if self._order is not None:
            x = x.index_select(1, self._order)
        return x.reshape(B * n * n, h * w)

    def gather(self, x: Tensor) -> Tensor:
        return self._arrange(x.view(self.shape))

    def laid_weights(self, weight: Tensor) -> Tensor:
        # (padding repeats a real pixel; a copy even where the layout is a view)
        return torch.where(self.member, self.gather(weight.contiguous()), 0)

    def per_pixel(self, grad: Tensor) -> Tensor:
        out = self.scatter(grad[:-1])
        # a view (L = 1, no padding) would hand the caller a kept scratch buffer
        return out.clone() if out.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr() else out

    def scatter(self, y: Tensor) -> Tensor:
        """``(S, C)`` laid out -> ``(N,)`` per pixel (padding dropped)."""
        B = self.shape[0]
        n, h, w = self.cells, self.cell_h, self.cell_w
        if self._bits is not None:
            f = self._bits
            y = y.reshape(B, *[2] * (2 * f), h, w).permute(self._from_quadtree).reshape(B, n * h, n * w)
            if self._row_back is not None:
                y = y.index_select(1, self._row_back)
            if self._col_back is not None:
                y = y.index_select(2, self._col_back)
            return y.reshape(-1)
        y = y.reshape(B, n * n, h * w)
        if self._order_back is not None:
            y = y.index_select(1, self._order_back)
        y = y.reshape(B, n, n, h, w).permute(0, 1, 3, 2, 4).reshape(B, n * h, n * w)
        if self._row_back is not None:
            y = y.index_select(1, self._row_back)
        if self._col_back is not None:
            y = y.index_select(2, self._col_back)
        return y.reshape(-1)


class GatherLayout(RowLayout):
    """Rows of pixels given by index: runs of an image-major pixel order (DR and DP bins).

    Row ``i`` holds its ``length[i]`` members in the middle: ``front[i] = q // 2`` padding
    entries before them and ``q - q // 2`` after (``q = C - length[i]``). For selections the
    prediction's front padding reads ``-inf`` and its back padding ``+inf``; with ``q`` even
    in every row, a row of any level then has as many entries below its members as it
    needs for the lower median to sit at column ``(width - 1) // 2``. The one unpaired entry
    of an odd ``q`` (the last column, the *swing*) is set per level so that the count holds.

    Attributes (beyond :class:`RowLayout`'s):
        index: ``(S, C)`` flat pixel of every entry (``N``/``N + 1`` for padding); dropped
            once the prediction and the target are laid out.
        inverse: ``(N,)`` entry of every pixel, ``S * C`` for a pixel in no context.
        front: ``(S,)`` padding entries before the members.

    Build with :meth:`from_sorted`.
    """

    def __init__(self, index, front, length, inverse, groups, num_pixels, num_valid=None, batch=1):
        self.index, self.front, self.length = index, front, length
        self.batch = batch
        self.num_valid = int(length.sum()) if num_valid is None else num_valid
        self.inverse, self.groups, self.num_pixels = inverse, groups, num_pixels
        self.shape = tuple(index.shape)
        self.swing = ((index.shape[1] - length) % 2).bool()
        self.target_medians: list[Tensor] | None = None  # per level (B, 2**l), if known
        self.laid_target: Tensor | None = None  # the target laid out, if known

    @property
    def member(self) -> Tensor:
        """``(S, C)`` bool, made on request (the loss needs only ``front`` and ``length``)."""
        column = torch.arange(self.shape[1], device=self.front.device)
        return (column >= self.front.unsqueeze(1)) & (column < (self.front + self.length).unsqueeze(1))

    @classmethod
    def from_sorted(
        cls,
        order: Tensor,
        start: Tensor,
        length: Tensor,
        width: int,
        levels: int,
        values: Tensor | None = None,
        num_valid: int | None = None,
    ) -> GatherLayout:
        """Finest contexts as runs of each image's pixels in an order (by value, for DR/DP).

        Args:
            order: ``(B, P)`` int32/int64, the pixel (within its image) at each place.
            start: ``(B, K)`` first place of each context's run; runs ascend and do not
                overlap (places between runs are pixels in no context).
            length: ``(B, K)`` pixels per context (run lengths).
            width: row width ``C >= max(length)``.
            levels: ``L``, with ``K = 2**(L-1)`` (level ``l`` joins ``2**(L-1-l)`` runs).
            values: ``(B, P)`` the target's values in this order, if they are what the loss
                will compare with: then the laid-out target is copied from them (row by
                row, in order) rather than gathered pixel by pixel.
            num_valid: valid pixels, if some are in no run (default: the run lengths' sum).
        """
        B, P = order.shape
        K = length.shape[1]
        N, S = B * P, B * K
        dev = order.device
        dtype = torch.int32 if max(N + 2, S * width + 1) < 2**31 else torch.int64
        front = torch.div(width - length, 2, rounding_mode="floor").view(S)
        start, length = start.reshape(S), length.reshape(S)
        # Row i shows the places first_i .. first_i + C - 1 of the image-major order (a
        # window: rows of a sliding-window view are copied whole), its padding masked.
        first = start + torch.arange(B, device=dev).repeat_interleave(K) * P - front + width
        column = torch.arange(width, dtype=dtype, device=dev)
        before = column < front.to(dtype).unsqueeze(1)
        after = column >= (front + length).to(dtype).unsqueeze(1)

        def windows(flat: Tensor, low, high) -> Tensor:
            ends = (flat.new_full((width,), low), flat, flat.new_full((width,), high))
            rows = torch.cat(ends).unfold(0, width, 1).index_select(0, first)
            return rows.masked_fill_(before, low).masked_fill_(after, high)

        pixel = order.to(dtype) + (torch.arange(B, device=dev, dtype=dtype) * P).unsqueeze(1)
        index = windows(pixel.view(-1), N, N + 1)  # padding -> N (reads -inf) before, N + 1 after
        del pixel
        # pixel -> its entry; pixels in no context -> the slot S * C (padding lands past N).
        # In blocks, so that the int64 copy of the index that index_copy_ needs stays small.
        inverse = torch.full((N + 2,), S * width, dtype=dtype, device=dev)
        flat, block = index.view(-1), 2**20
        for begin in range(0, flat.numel(), block):
            part = flat[begin : begin + block]
            entries = torch.arange(begin, begin + part.numel(), dtype=dtype, device=dev)
            inverse.index_copy_(0, part.long(), entries)
        inverse = inverse[:N]
        laid_target = None if values is None else windows(values.reshape(-1), -float("inf"), float("inf"))
        groups = [2 ** (levels - 1 - lvl) for lvl in range(levels)]
        layout = cls(index, front, length, inverse, groups, N, num_valid, B)
        layout.laid_target = laid_target
        return layout

    def gather(self, x: Tensor) -> Tensor:
        """``(N,)`` -> ``(S, C)``, padding ``-inf`` before the members and ``+inf`` after."""
        padded = torch.cat([x, torch.tensor([-float("inf"), float("inf")], dtype=x.dtype, device=x.device)])
        return padded.index_select(0, self.index.view(-1)).view(self.index.shape)

    def gather_pair(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if self.laid_target is not None:
            G, self.laid_target = self.laid_target.to(target.dtype), None
        else:
            target = torch.nan_to_num(target, 0.0, 0.0, 0.0)  # non-finite targets are invalid
            G = self.gather(target)
        # bounds of the members (all pixels' extremes) for spreading the padding; the
        # target's only where its medians are selected
        selected = (pred,) if self.target_medians is not None else (pred, target)
        self._bounds = [_extremes(x) for x in selected]
        P = self.gather(pred)
        self.index = None  # single use: the backward goes through ``inverse``
        return P, G

    def centring_mask(self, dtype: torch.dtype) -> None:
        return None

    def level_medians(self, P, G, counts, work, target_column=True):
        S, C = self.shape
        known = self.target_medians
        if not _numpy_selects(P):
            out = []
            for level, (group, n) in enumerate(zip(self.groups, counts)):
                R = S // group
                for x in (P, G) if known is None else (P,):
                    self.set_swing(x, group)
                picked = padded_row_lower_medians([P.view(R, -1)] if known is not None else [P.view(R, -1), G.view(R, -1)], work)
                if known is not None:
                    tg = known[level].reshape(-1).to(G.dtype)
                    cg = (G.view(R, -1) == tg.unsqueeze(1)).to(torch.uint8).argmax(1) if target_column else None
                    picked.append((tg, cg))
                out.append(_empty_to_zero(picked, n))
            return out
        # CPU: every level's selections in one round of the two selection threads; the swing
        # entries take their level's signs in the selection copies
        swing_at = self.swing.nonzero().squeeze(1).numpy() * C + (C - 1)
        selections = []
        for level, (group, n) in enumerate(zip(self.groups, counts)):
            R = S // group
            width = group * C
            column = (width - 1) // 2
            fill = np.where(self.swing_below(group).numpy(), -np.inf, np.inf)
            bounds = self._spread_bounds(n, width)
            p_ramps = _spread_ramps(bounds[0], width, P.numpy().dtype) if bounds else None
            selections.append(_Selection(P.detach().numpy().reshape(R, width), column, True, swing_at, fill, p_ramps))
            g_rows = G.detach().numpy().reshape(R, width)
            if known is None:
                g_ramps = _spread_ramps(bounds[1], width, g_rows.dtype) if bounds else None
                selections.append(_Selection(g_rows, column, target_column, swing_at, fill, g_ramps))
            else:  # the target's medians are known: at most a column to find (padding never hits)
                tg = known[level].reshape(-1).to(G.dtype).numpy()
                selections.append(_Selection(g_rows, column, target_column, known=tg))
        picked = _run_selections(selections, work)
        return [_empty_to_zero(picked[2 * i : 2 * i + 2], n) for i, n in enumerate(counts)]

    def _spread_bounds(self, count: Tensor, width: int) -> list | None:
        """The members' bounds where some row is mostly padding (then spreading pays), else ``None``."""
        return getattr(self, "_bounds", None) if bool((2 * count < width).any()) else None

    def per_pixel(self, grad: Tensor) -> Tensor:
        return grad.index_select(0, self.inverse)

    def laid_weights(self, weight: Tensor) -> Tensor:
        S, C = self.shape
        # pixels in no context all land in the extra slot S * C, which is dropped
        out = weight.new_zeros(S * C + 1).index_copy_(0, self.inverse.long(), weight)
        return out[: S * C].view(S, C)

    def swing_below(self, group: int) -> Tensor:
        """For each swing entry (rows of ``self.swing``, in order), whether it reads ``-inf``
        (else ``+inf``) so that the lower median of every row of the ``group`` view sits at
        column ``(group * C - 1) // 2``."""
        S, C = self.shape
        R = S // group
        n = self.length.view(R, group).sum(1)
        swing = self.swing.view(R, group)
        m = swing.sum(1)
        column = (group * C - 1) // 2
        below = column - torch.div(n - 1, 2, rounding_mode="floor").clamp(min=0)
        paired = (group * C - n - m) // 2  # front padding entries, all -inf
        need = (below - paired).clamp(min=0)
        low = swing & (torch.cumsum(swing, dim=1) <= need.unsqueeze(1))
        return low.view(-1)[self.swing]

    def set_swing(self, x: Tensor, group: int) -> None:
        """Give the swing entries of ``x`` (``(S, C)``, infinite padding) the signs that put the
        lower median of every row of the ``group`` view at column ``(group * C - 1) // 2``."""
        S, C = self.shape
        x = x.view(S, C)
        if not bool(self.swing.any()):
            return
        inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
        rows = self.swing.nonzero().squeeze(1)
        x[:, C - 1].index_put_((rows,), torch.where(self.swing_below(group), -inf, inf))


_NUMPY_SELECTION = True  # tests switch it off to run the torch.kthvalue path (CUDA's) on CPU


def _numpy_selects(x: Tensor) -> bool:
    """Whether row selections on ``x`` run in NumPy (CPU tensors) or in torch."""
    return _NUMPY_SELECTION and x.device.type == "cpu"


def _pool() -> ThreadPoolExecutor:
    """Two worker threads for the selections, made anew in a forked child (whose copy of
    the parent's pool has no threads)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hdn-select"), os.getpid()
    return _POOL


def _extremes(x: Tensor) -> tuple[float, float] | None:
    """``(min, max)`` of a finite tensor as floats, ``None`` if it is empty."""
    if not x.numel():
        return None
    low, high = torch.aminmax(x)
    return float(low), float(high)


class _Workspace:
    """Scratch buffers shaped like ``like`` (two, or ``count``) for one call, kept per thread on CPU.

    Every level of a call reuses them (selection copies first, then the centred values),
    and on CPU so does the next call: a fresh large buffer costs as much in page faults as
    the arithmetic on it. On CUDA torch's caching allocator already recycles memory, so
    nothing is kept. :func:`clear_workspace` releases what is kept.
    """

    def __init__(self, like: Tensor, count: int = 2):
        n = like.numel()
        size = n + 1
        kept = getattr(_KEPT, "buffers", None) if like.device.type == "cpu" else None
        if kept is None or kept[0].dtype != like.dtype or kept[0].numel() < size or len(kept) < count:
            flat = [torch.empty(size, dtype=like.dtype, device=like.device) for _ in range(count)]
            if like.device.type == "cpu":
                _KEPT.buffers = flat
            kept = flat
        self._flat = [b[: n + 1] for b in kept]
        self.tensors = [b[:n].view(like.shape) for b in kept]

    def view(self, index: int, rows: int) -> Tensor:
        return self.tensors[index].view(rows, -1)

    def with_zero(self, index: int) -> Tensor:
        """Buffer ``index`` flat, with one more entry, 0, at the end."""
        flat = self._flat[index]
        flat[-1] = 0
        return flat

    def array(self, index: int) -> np.ndarray:
        return self.tensors[index].view(-1).numpy()


_KEPT = threading.local()


def clear_workspace() -> None:
    """Release the scratch buffers that the row core keeps for this thread (CPU)."""
    _KEPT.buffers = None


def _spread_ramps(bounds: tuple[float, float] | None, width: int, dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """Per column, distinct values below ``bounds[0]`` and above ``bounds[1]``.

    Introselect slows down by an order of magnitude on rows that are mostly copies of one
    value (a small bin padded with ``-inf`` and ``+inf``). Clipping a row to these ramps
    turns its infinite entries into distinct values on the same sides of every member, and
    leaves the members (inside ``bounds``) as they are. ``None`` where the ramps would
    overflow."""
    if bounds is None:
        return None
    lo, hi = bounds
    step = max(abs(lo), abs(hi), 1.0) * 2.0**-16
    offsets = np.arange(1, width + 1, dtype=np.float64) * step
    largest = float(np.finfo(dtype).max)
    if not (lo - offsets[-1] > -largest and hi + offsets[-1] < largest):
        return None
    low, high = (lo - offsets).astype(dtype), (hi + offsets).astype(dtype)
    if low[0] >= lo or high[0] <= hi:
        return None
    return low, high


class _Selection(NamedTuple):
    """One row selection on the CPU: the ``column``-th smallest entry of every row of ``x``
    (``(R, W)`` NumPy, never written), in a copy whose flat positions ``fill_at`` (sorted)
    read ``fill`` (``-inf``/``+inf``) and whose infinite entries are spread to ``ramps``
    (:func:`_spread_ramps`) when given; with ``known`` values no selection, only the column
    search. ``want_column``: also find the first column holding the value, filled positions
    excluded."""

    x: np.ndarray
    column: int
    want_column: bool = True
    fill_at: np.ndarray | None = None
    fill: np.ndarray | None = None
    ramps: tuple[np.ndarray, np.ndarray] | None = None
    known: np.ndarray | None = None


def _select_part(sel: _Selection, first: int, last: int, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """:class:`_Selection` on rows ``first:last``, with ``buf`` (flat, at least as large)
    holding the partitioned copy and then the hit mask."""
    x = sel.x[first:last]
    width = x.shape[1]
    at = fill = None
    if sel.fill_at is not None and sel.fill_at.size:
        lo, hi = np.searchsorted(sel.fill_at, (first * width, last * width))
        at, fill = sel.fill_at[lo:hi] - first * width, sel.fill[lo:hi]
        if sel.ramps is not None:  # each fill takes its column's ramp value on its side
            col = at % width
            fill = np.where(fill < 0, sel.ramps[0][col], sel.ramps[1][col])
    if sel.known is None:
        filled = buf[: x.size].reshape(x.shape)
        if sel.ramps is not None:  # (np.clip is several times slower)
            np.minimum(np.maximum(x, sel.ramps[0], out=filled), sel.ramps[1], out=filled)
        else:
            np.copyto(filled, x)
        if at is not None:
            filled.reshape(-1)[at] = fill
        filled.partition(sel.column, axis=1)
        value = filled[:, sel.column].copy()
    else:
        value = sel.known[first:last]
    if not sel.want_column:
        return value, None
    hits = buf.view(np.bool_)[: x.size].reshape(x.shape)
    np.equal(x, value[:, None], out=hits)
    if at is not None:
        hits.reshape(-1)[at] = False
    return value, np.argmax(hits, axis=1)


def _run_selections(selections: list[_Selection], work: _Workspace) -> list[tuple[Tensor, Tensor | None]]:
    """Run row selections in one round of two threads when torch may use two: the rows of
    each selection are halved between them (buffers 0 and 1 of ``work``), so that the two
    threads share the work evenly and start once (a thread started right after a parallel
    torch operation shares its core with OpenMP's spin-waiting worker for a few ms).

    Returns per selection ``(value (R,), column (R,) int64 or None)``."""
    threaded = torch.get_num_threads() > 1 and sum(s.x.size for s in selections) >= 2**16
    parts: list[list[tuple[int, int, int]]] = [[], []]
    load = [0, 0]
    for i, sel in enumerate(selections):
        R = sel.x.shape[0]
        if threaded and R > 1:
            half = R // 2
            parts[0].append((i, 0, half))
            parts[1].append((i, half, R))
        else:
            j = int(threaded and load[1] < load[0])
            parts[j].append((i, 0, R))
            load[j] += sel.x.size

    def job(j: int) -> list[tuple[int, int, np.ndarray, np.ndarray | None]]:
        buf = work.array(j)
        return [(i, first, *_select_part(selections[i], first, last, buf)) for i, first, last in parts[j]]

    done = [r for rs in (_pool().map(job, (0, 1)) if threaded else [job(0)]) for r in rs]
    out = []
    for i in range(len(selections)):
        pieces = sorted((first, v, c) for k, first, v, c in done if k == i)
        value = np.concatenate([v for _, v, _ in pieces])
        column = None if pieces[0][2] is None else np.concatenate([c for _, _, c in pieces])
        out.append((torch.from_numpy(value), None if column is None else torch.from_numpy(column).to(torch.int64)))
    return out


def _empty_to_zero(picked: list[tuple[Tensor, Tensor | None]], count: Tensor) -> tuple:
    """Medians of rows without members set to 0 (selected ones are padding there)."""
    empty = count == 0
    return tuple((t.masked_fill(empty, 0), c) for t, c in picked)


def _member_selections(
    values: list[Tensor],
    count: Tensor,
    outside: _Outside,
    bounds: list | None = None,
    columns: Sequence[bool] | None = None,
) -> list[_Selection]:
    """Selections for the lower medians of the members of rows ``(R, W)``, the entries
    outside the members filled with ``-inf``/``+inf`` (see :func:`row_lower_medians`)."""
    W = values[0].shape[1]
    column = (W - 1) // 2
    fill = outside.fill(W, count.numpy(), column)
    bounds = bounds or [None] * len(values)
    columns = columns or [True] * len(values)
    out = []
    for x, b, want in zip(values, bounds, columns):
        rows = x.detach().numpy()
        out.append(_Selection(rows, column, want, outside.positions, fill, _spread_ramps(b, W, rows.dtype)))
    return out


class _Outside:
    """The entries outside the members of a layout, for filling rows before a selection.

    Args:
        member: ``(S, C)`` bool (CPU).
    """

    def __init__(self, member: Tensor):
        self.positions = np.flatnonzero(~member.numpy())

    def fill(self, width: int, count: np.ndarray, column: int) -> np.ndarray:
        """``-inf``/``+inf`` for each outside entry in the ``(-1, width)`` view: in a row of
        ``n`` members its first ``column - (n - 1) // 2`` outside entries go below."""
        pos = self.positions
        row = pos // width
        # rank of each outside entry within its row, counted from 1
        first = np.searchsorted(pos, np.arange(count.size) * width)
        rank = np.arange(1, pos.size + 1) - first[row]
        below = column - np.maximum((count - 1) // 2, 0)
        return np.where(rank <= below[row], -np.inf, np.inf)


def row_lower_medians(
    values: list[Tensor],
    member: Tensor,
    count: Tensor,
    outside: _Outside | None = None,
    work: _Workspace | None = None,
    bounds: list[tuple[float, float]] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Lower median of the members of every row, and a column where it stands.

    The entries outside the members become ``-inf`` or ``+inf``, ``column - (n - 1) // 2``
    of them ``-inf`` in a row of ``n`` members, so that the members' lower median is the
    ``column = (C - 1) // 2``-th smallest entry of every row: one selection for rows of any
    member count. CPU: NumPy's introselect, the tensors side by side in two threads when
    torch may use two; elsewhere :func:`torch.kthvalue`.

    Args:
        values: tensors ``(R, C)`` sharing the member pattern (finite everywhere).
        member: ``(R, C)`` bool.
        count: ``(R,)`` members per row.
        outside: ``_Outside`` of the layout that ``member`` is a view of, if known.
        work: selection buffers, if known.
        bounds: per tensor, bounds of its members, to spread the fills (see :func:`_spread_ramps`).

    Returns:
        per tensor ``(median (R,), column (R,) int64)``; rows without members get median 0
        and an arbitrary column.
    """
    C = member.shape[1]
    column = (C - 1) // 2
    empty = count == 0
    if not _numpy_selects(member):
        below = column - torch.div(count - 1, 2, rounding_mode="floor").clamp(min=0)
        out = ~member
        low = out & (torch.cumsum(out, dim=1) <= below.unsqueeze(1))
        inf = torch.full((), float("inf"), dtype=values[0].dtype, device=member.device)
        pad = torch.where(low, -inf, inf)
        picked = [torch.kthvalue(torch.where(member, x, pad), column + 1, dim=1) for x in values]
        return [(v.masked_fill(empty, 0), w) for v, w in picked]
    if outside is None:
        outside = _Outside(member)
    if work is None:
        work = _Workspace(values[0])
    picked = _run_selections(_member_selections(values, count, outside, bounds), work)
    return list(_empty_to_zero(picked, count))


def padded_row_lower_medians(
    values: list[Tensor],
    work: _Workspace,
    bounds: list[tuple[float, float]] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Lower medians of rows whose padding already reads ``-inf``/``+inf`` in the right
    numbers (:meth:`GatherLayout.set_swing`): each row's middle entry after selection.

    Args:
        values: tensors ``(R, C)``.
        work: selection buffers.
        bounds: per tensor, a lower and an upper bound of its members, if known.

    Returns:
        per tensor ``(median (R,), column (R,) int64)``; a row without members gives an
        infinite median, which the caller replaces by 0.
    """
    width = values[0].shape[1]
    column = (width - 1) // 2
    if not _numpy_selects(values[0]):
        return [tuple(torch.kthvalue(x, column + 1, dim=1)) for x in values]  # type: ignore[misc]
    rows = [x.detach().numpy() for x in values]
    bounds = bounds or [None] * len(values)
    selections = [_Selection(x, column, ramps=_spread_ramps(b, width, x.dtype)) for x, b in zip(rows, bounds)]
    return _run_selections(selections, work)


REDUCTIONS = ("mean", "sum", "per_image", "none")
"""What the losses return: the batch mean, the sum, one value per image, the per-pixel map."""


class RowHierarchicalSSI(torch.autograd.Function):
    """HDN's ``"mean"`` aggregation over a :class:`RowLayout`.

    ``forward(pred, target, layout, reduction="mean", image_valid=None)`` with flat ``(N,)``
    inputs, ``pred`` finite, and the layout of the valid pixels. Every member pixel is in
    exactly one context per level, so its loss ``m_i`` is the mean of its ``L`` per-level
    losses (0 for a pixel in no row). ``reduction``:

    * ``"mean"``: ``sum_i m_i / N_v`` with ``N_v = layout.num_valid``;
    * ``"sum"``: ``sum_i m_i``;
    * ``"per_image"``: ``(B,)``, image ``b``'s ``sum_i m_i / N_v,b`` with ``image_valid[b] = N_v,b``
      (its valid pixels; 0 for an image without any);
    * ``"none"``: ``(N,)``, the map ``m``.

    A batch without a valid pixel gives 0 and a zero gradient. The backward is analytic: a
    scalar (``"mean"``, ``"sum"``) or per-row (``"per_image"``) factor on the saved signs, or
    per-entry weights laid out like the rows (``"none"``).
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, layout: RowLayout, reduction: str = "mean", image_valid: Tensor | None = None) -> Tensor:  # type: ignore[override]
        zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
        # ``pred`` is finite (the caller's check); non-finite targets are invalid.
        P, G = layout.gather_pair(pred, target)
        mask = layout.centring_mask(pred.dtype)
        S = P.shape[0]
        work = _Workspace(P)
        total = zero.clone()
        per_image = pred.new_zeros(layout.batch) if reduction == "per_image" else None
        loss_map = pred.new_zeros(P.numel() + 1) if reduction == "none" else None  # laid out, trailing 0
        saved = []
        backward = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        counts = [layout.length.view(S // group, group).sum(1) for group in layout.groups]
        medians = layout.level_medians(P, G, counts, work, ctx.needs_input_grad[1])
        for group, n, ((tp, cp), (tg, cg)) in zip(layout.groups, counts, medians):
            R = S // group
            Pl, Gl = P.view(R, -1), G.view(R, -1)
            n1 = (n + 1).to(pred.dtype)
            # two buffers, no temporaries: x - t for each, then p_hat - g_hat in the first
            dp, dg = work.view(0, R), work.view(1, R)
            ig = (_abs_row_sums(_centered(Gl, tg, mask, R, dg)) / n1 + EPS).reciprocal_()
            ip = (_abs_row_sums(_centered(Pl, tp, mask, R, dp)) / n1 + EPS).reciprocal_()
            diff = dp.mul_(ip.unsqueeze(1)).addcmul_(dg, ig.neg().unsqueeze(1))
            row_loss = _abs_row_sums(diff)  # sum |p_hat - g_hat|
            if per_image is not None:
                per_image += row_loss.view(layout.batch, -1).sum(1)
            elif loss_map is not None:
                loss_map[:-1].view(R, -1).add_(diff.abs())  # 0 outside the members
            else:
                total = total + row_loss.sum()
            if not backward:
                continue
            # for the backward: sign(p_hat - g_hat) and, per row, its sum and its products
            # with g_hat and p_hat (sum s g_hat + sum |p_hat - g_hat|)
            sign = diff.sign_()
            saved_sign, sign_sum = sign.to(torch.int8), sign.sum(1)
            signed_g = sign.mul_(dg).sum(1).mul_(ig)
            saved.append((n, tp, ip, cp, tg, ig, cg, saved_sign, sign_sum, row_loss + signed_g, signed_g))
        del work
        levels = len(layout.groups)
        n_valid = layout.num_valid
        if reduction == "mean":
            scale: float | Tensor = 1.0 / (levels * n_valid) if n_valid else 0.0
            out = total * scale
        elif reduction == "sum":
            scale = 1.0 / levels
            out = total * scale
        elif reduction == "per_image":
            counts_b = image_valid.to(pred.dtype)
            scale = torch.where(counts_b > 0, 1.0 / (levels * counts_b.clamp(min=1)), 0.0)  # (B,)
            out = per_image * scale
        else:
            scale = 1.0 / levels
            out = layout.per_pixel(loss_map).mul_(scale)
        ctx.layout, ctx.saved, ctx.scale, ctx.mask, ctx.reduction = layout, saved, scale, mask, reduction
        need_p, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(P if need_p else None, G if need_g else None)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        need_p, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_p or need_g):
            return None, None, None, None, None
        P, G = ctx.saved_tensors
        layout, mask = ctx.layout, ctx.mask
        X = P if need_p else G
        S = X.shape[0]
        work = _Workspace(X)
        # the gradients accumulate in the layout, with a trailing 0 for the per-pixel gather
        grad_p = work.with_zero(1) if need_p else None
        grad_g = X.new_zeros(X.numel() + 1) if need_g else None
        for grad in (grad_p, grad_g):
            if grad is not None:
                grad.zero_()
        # d loss / d |p_hat - g_hat| at every member entry: a scalar ("mean", "sum"), one per
        # image ("per_image"; rows are image-major) or one per entry ("none")
        c = grad_output * ctx.scale
        weights = layout.laid_weights(c) if ctx.reduction == "none" else None
        for group, (n, tp, ip, cp, tg, ig, cg, sign, sign_sum, signed_p, signed_g) in zip(layout.groups, ctx.saved):
            R = S // group
            n1 = (n + 1).to(X.dtype)
            s = sign.view(R, -1)  # sign(p_hat - g_hat), int8
            if weights is not None:
                k = weights.view(R, -1)
                if need_p:
                    _row_weighted_normalization_backward(P.view(R, -1), mask, s, k, tp, ip, cp, n, n1, work.view(0, R), grad_p)
                if need_g:
                    _row_weighted_normalization_backward(G.view(R, -1), mask, s, -k, tg, ig, cg, n, n1, work.view(0, R), grad_g)
                continue
            k = c.repeat_interleave(R // layout.batch) if c.dim() else c
            if need_p:
                _row_normalization_backward(
                    P.view(R, -1), mask, s, k, tp, ip, cp, n, n1, sign_sum, signed_p, work.view(0, R), grad_p
                )
            if need_g:
                _row_normalization_backward(
                    G.view(R, -1), mask, s, -k, tg, ig, cg, n, n1, sign_sum, signed_g, work.view(0, R), grad_g
                )
        del work
        return (
            layout.per_pixel(grad_p) if need_p else None,
            layout.per_pixel(grad_g) if need_g else None,
            None,
            None,
            None,
        )


def _abs_row_sums(x: Tensor, block: int = 2**19) -> Tensor:
    """``x.abs().sum(1)`` for ``(R, W)`` ``x``, a block of about ``block`` entries (whole rows)
    at a time, so that the temporary stays small. (:func:`torch.linalg.vector_norm` needs
    none, but sums float32 rows about a hundred times less accurately.)"""
    R, W = x.shape
    rows = max(1, block // max(W, 1))
    if rows >= R:
        return x.abs().sum(1)
    return torch.cat([part.abs().sum(1) for part in x.split(rows)])


def _centered(x: Tensor, t: Tensor, mask: Tensor | None, rows: int, out: Tensor) -> Tensor:
    """``x - t`` per row at the members and 0 elsewhere, into ``out``.

    ``mask`` is the layout's float member mask, or ``None`` where every entry outside the
    members is infinite (then the difference is infinite there and reset to 0)."""
    centered = torch.sub(x, t.unsqueeze(1), out=out)
    if mask is None:
        return centered.nan_to_num_(0.0, 0.0, 0.0)
    return centered.mul_(mask.view(rows, -1))


def _row_normalization_backward(
    x: Tensor,
    mask: Tensor | None,
    s: Tensor,
    k: Tensor,
    t: Tensor,
    inv: Tensor,
    col: Tensor,
    n: Tensor,
    n1: Tensor,
    s_sum: Tensor,
    s_dot_hat: Tensor,
    work: Tensor,
    grad: Tensor,
) -> None:
    """Add the gradient of ``k * sum(s * x_hat)`` w.r.t. ``x`` for one level's rows to ``grad``.

    With ``d = s_x + eps``, ``x_hat_i = (x_i - t) / d`` over the members and
    ``s_x = sum_j |x_j - t| / (n + 1)``, and ``r_i = k s_i``:
    ``dL/dx_i = r_i / d + dL/ds_x * sign(x_i - t) / (n + 1)`` directly,
    ``dL/ds_x = -sum_i r_i x_hat_i / d``, and
    ``dL/dt = -sum_i r_i / d - dL/ds_x * sum_i sign(x_i - t) / (n + 1)`` goes to the median
    entry, at ``col`` of each row (the derivation is in notebook 04). The row sums
    ``sum_i s_i`` (``s_sum``) and ``sum_i s_i x_hat_i`` (``s_dot_hat``) come from the
    forward; ``work`` is a scratch buffer like ``x``, ``grad`` the flat accumulator.

    Args:
        x: ``(R, C)`` laid-out values; ``s``: ``(R, C)`` int8 signs (0 outside the members).
        k: scalar, ``d loss / d |p_hat - g_hat|`` with the sign of ``x`` in the difference.
        t, inv, col, n, n1, s_sum, s_dot_hat: ``(R,)`` per-row median, ``1 / d``, median
            column, member count, ``n + 1``, and the two sums.
    """
    R, C = x.shape
    k_inv = k * inv
    d_scale_per_n = (-k_inv * s_dot_hat).div_(n1)
    sign = _centered(x, t, mask, R, work).sign_()
    d_shift = (-k_inv * s_sum - d_scale_per_n * sign.sum(1)) * (n > 0)
    out = grad[: R * C].view(R, C)
    out.addcmul_(sign, d_scale_per_n.unsqueeze(1))
    out.addcmul_(work.copy_(s), k_inv.unsqueeze(1))  # (a float copy: int8 operands are slow)
    flat = torch.arange(R, device=x.device) * C + col
    grad.index_add_(0, flat, d_shift)


def _row_weighted_normalization_backward(
    x: Tensor,
    mask: Tensor | None,
    s: Tensor,
    k: Tensor,
    t: Tensor,
    inv: Tensor,
    col: Tensor,
    n: Tensor,
    n1: Tensor,
    work: Tensor,
    grad: Tensor,
) -> None:
    """:func:`_row_normalization_backward` with a weight per entry: add the gradient of
    ``sum(k * s * x_hat)`` w.r.t. ``x`` to ``grad``, ``k`` ``(R, C)`` (0 outside the members).

    With ``r_i = k_i s_i`` the formulas are those of :func:`_row_normalization_backward`;
    the row sums ``sum_i r_i`` and ``sum_i r_i x_hat_i`` are taken here (the forward's sums
    hold only for a weight per row)."""
    R, C = x.shape
    r = s.to(x.dtype).mul_(k)
    centered = _centered(x, t, mask, R, work)
    sum_r = r.sum(1)
    d_scale_per_n = (r * centered).sum(1).mul_(inv).mul_(inv).neg_().div_(n1)  # dL/ds / (n + 1)
    sign = centered.sign_()
    d_shift = (-inv * sum_r - d_scale_per_n * sign.sum(1)) * (n > 0)
    out = grad[: R * C].view(R, C)
    out.addcmul_(sign, d_scale_per_n.unsqueeze(1))
    out.addcmul_(r, inv.unsqueeze(1))
    flat = torch.arange(R, device=x.device) * C + col
    grad.index_add_(0, flat, d_shift)
