"""The run core: nested partition levels as contiguous runs of one pixel order.

SSI (the whole image), DS grids and DR/DP bins are *nested partitions* of each image's
member pixels: every context of level ``l`` is the union of consecutive contexts of the
finest level. A :class:`RunLayout` lists the members of the batch in one order, image by
image and finest context by finest context (DS cells in quadtree order, each cell's pixels
row-major; DR/DP bins in depth order, each bin's pixels by depth, ties by pixel index).
Then every context of every level is a contiguous *run* ``[start, start + n)`` of that
order, and the loss is a sequence of flat passes over the ``M`` members per level:

* per-context statistics are segment sums of runs (:func:`segment_sums`, accumulated in
  float64, so that long runs sum as accurately as a pairwise sum);
* per-context values reach their members by one gather of a segment id;
* medians are a segmented selection (:meth:`_Level.lower_medians`): the runs of a level are
  grouped by length into classes of width ``2**k`` (a run of ``n`` members goes to the
  class ``2**(k-1) < n <= 2**k``), each class is gathered into a ``(rows, 2**k)`` matrix
  whose other entries are distinct values below and above every member, arranged so that
  the lower median of every row sits at its middle column, and one row selection per class
  finds them all. Padding is below ``2x`` whatever the depth distribution or the sparsity
  of the ground truth, and the loop runs over length classes (at most ``log2`` of the
  longest run), never over contexts;
* on CPU, a level's per-member passes run piece by piece (:data:`_PIECE` members), so that
  their temporaries are piece-sized; other devices take a level in one piece.

The same code runs on every device but for its kernels. On CPU the row selections run in
NumPy's introselect (:func:`numpy.partition`, seven times faster than :func:`torch.kthvalue`
there) in two threads, in place, so the median's first member is found by a comparison
pass over the members; the padding is a masked :func:`numpy.copyto` and per-run values
reach members by :func:`numpy.repeat`. Elsewhere the selections are :func:`torch.kthvalue`,
which leaves its rows unchanged: the median's first member is read off them.
``_NUMPY = False`` makes the CPU run torch's kernels (the tests and the benchmark use it to
exercise and time CUDA's path).

:class:`RunHierarchicalSSI` is the loss, with an analytic backward (the derivation of
:func:`hdn._core.segments._normalization_backward`). Between forward and backward it keeps
the prediction (and the target, where its gradient is wanted) in run order, an int8 sign
per member and level, and a few values per context.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from hdn._core.segments import EPS

__all__ = ["REDUCTIONS", "RunHierarchicalSSI", "RunLayout", "segment_sums"]

_NUMPY = True  # tests and the benchmark switch it off to run CUDA's torch kernels on CPU

REDUCTIONS = ("mean", "sum", "per_image", "none")
"""What the losses return: the batch mean, the sum, one value per image, the per-pixel map."""

_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0


def _pool() -> ThreadPoolExecutor:
    """Two worker threads for NumPy's selections and sorts (which release the GIL), made anew
    in a forked child, whose copy of the parent's pool has no threads (a DataLoader worker)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hdn-select"), os.getpid()
    return _POOL


def _numpy_kernels(x: Tensor) -> bool:
    """Whether selections and segment sums on ``x`` run in NumPy (CPU) or in torch."""
    return _NUMPY and x.device.type == "cpu"


class RunLayout:
    """The members of a batch's nested contexts, as runs of one pixel order.

    Args:
        order: ``(M,)`` int32/int64 flat pixel index (into ``B * H * W``) of every member, image
            by image, finest context by finest context.
        lengths: ``(S,)`` int64 members per finest context (image-major, ``S / B`` per image).
        groups: per level (level 0 first), the number of consecutive finest contexts that
            form one context of that level; ``S`` is divisible by each.
        num_pixels: ``N = B * H * W``.
        batch: ``B``.
        num_valid: the loss's denominator (valid pixels, members or not).
        laid_target: ``(M,)`` the target in run order, if already known.
        target_sorted: True if, within every context of every level, the order ascends in
            the target (DR/DP bins with the contexts' own target): then the target's median
            of a run of ``n`` is its member ``(n - 1) // 2``, with no selection.
        pixel_order: True if ``order`` ascends (the whole image's valid pixels row-major).
        host_lengths: ``lengths`` on the host, if the caller already has them.

    Members are valid pixels: the target is finite at every one of them. Where every pixel
    is a member in pixel order (SSI on fully valid images), the layout is the *identity*:
    tensors in run order are the per-pixel tensors themselves, with no gather or scatter.
    """

    def __init__(
        self,
        order: Tensor,
        lengths: Tensor,
        groups: list[int],
        num_pixels: int,
        batch: int,
        num_valid: int | None = None,
        laid_target: Tensor | None = None,
        target_sorted: bool = False,
        pixel_order: bool = False,
        host_lengths: np.ndarray | None = None,
    ):
        self.order = order
        self.lengths = lengths.to(torch.int64)
        # (the layout's one host sync, unless the caller made it)
        self.host_lengths = self.lengths.cpu().numpy() if host_lengths is None else host_lengths.astype(np.int64)
        self.groups = list(groups)
        self.num_pixels = num_pixels
        self.batch = batch
        self.num_members = int(self.host_lengths.sum())
        self.num_valid = self.num_members if num_valid is None else num_valid
        self.laid_target = laid_target
        self.target_sorted = target_sorted
        S = self.lengths.numel()
        if order.numel() != self.num_members or any(S % g for g in self.groups) or S % batch:
            raise ValueError("Invalid run layout: order, lengths and groups do not agree.")
        self.identity = pixel_order and self.num_members == num_pixels
        self._finest_id: Tensor | None = None
        self._order64: Tensor | None = None

    @property
    def num_levels(self) -> int:
        return len(self.groups)

    def level_lengths(self, level: int) -> np.ndarray:
        """``(S_l,)`` host members per context of ``level``."""
        return self.host_lengths.reshape(-1, self.groups[level]).sum(1)

    def segment_ids(self, level: int) -> Tensor:
        """``(M,)`` int32/int64 the context of ``level`` (``0 .. S_l - 1``) of every member."""
        if self._finest_id is None:
            S = self.lengths.numel()
            dtype = torch.int32 if S < 2**31 else torch.int64
            ids = torch.arange(S, dtype=dtype, device=self.order.device)
            self._finest_id = torch.repeat_interleave(ids, self.lengths, output_size=self.num_members)
        group = self.groups[level]
        return self._finest_id if group == 1 else torch.div(self._finest_id, group, rounding_mode="floor")

    def gather(self, x: Tensor) -> Tensor:
        """``(N,)`` per pixel -> ``(M,)`` in run order (``x`` itself for the identity)."""
        return x if self.identity else x.index_select(0, self.order)

    def per_pixel(self, y: Tensor) -> Tensor:
        """``(M,)`` in run order -> ``(N,)`` per pixel, 0 for pixels that are no member
        (``y`` itself for the identity)."""
        if self.identity:
            return y
        if self._order64 is None:  # (index_copy_ takes int64 only; made once per call)
            self._order64 = self.order.to(torch.int64)
        return y.new_zeros(self.num_pixels).index_copy_(0, self._order64, y)

    # -- layouts of the fixed hierarchies ---------------------------------------------------

    @classmethod
    def whole_image(cls, valid: Tensor) -> RunLayout:
        """SSI: one context per image, its valid pixels row-major. ``valid``: ``(B, H, W)``."""
        B = valid.shape[0]
        flat = valid.reshape(B, -1)
        if valid.device.type == "cpu":  # (NumPy: three times faster than a compress of arange)
            order = np.flatnonzero(flat.numpy())
            # members per image: where each image's pixels begin in the ascending order
            host = np.diff(np.searchsorted(order, np.arange(B + 1) * flat.shape[1]))
            return cls(torch.from_numpy(order), torch.from_numpy(host), [1], valid.numel(), B, pixel_order=True, host_lengths=host)
        order = torch.nonzero(flat.reshape(-1)).squeeze(1)
        return cls(order, torch.count_nonzero(flat, dim=1), [1], valid.numel(), B, pixel_order=True)

    @classmethod
    def grid(cls, valid: Tensor, levels: int) -> RunLayout:
        """DS: finest cells (the bounds of docs/semantics.md §3) in quadtree order, so that a
        cell of level ``l`` is ``4**(L-1-l)`` consecutive finest cells; pixels row-major
        within a finest cell. ``valid``: ``(B, H, W)``."""
        if levels == 1:
            return cls.whole_image(valid)
        B, H, W = valid.shape
        HW = H * W
        dev = valid.device
        cells = 2 ** (levels - 1)
        place, cell_ends = _quadtree_places(H, W, cells)
        place = place.to(dev)  # (HW,) the pixel at each place of one image's quadtree order
        if dev.type == "cpu":  # (NumPy's take is four times faster here)
            valid_at = torch.from_numpy(np.take(valid.reshape(B, HW).numpy(), place.numpy(), axis=1))
        else:
            valid_at = valid.reshape(B, HW).index_select(1, place)  # (B, HW) validity by place
        dtype = torch.int32 if valid.numel() < 2**31 else torch.int64
        pixel = place.to(dtype).unsqueeze(0) + (torch.arange(B, device=dev, dtype=dtype) * HW).unsqueeze(1)
        # members per finest cell: the running count of valid places at each cell's end
        running = torch.cumsum(valid_at, dim=1, dtype=torch.int32)
        ends = running.index_select(1, cell_ends.to(dev))
        lengths = torch.diff(ends, dim=1, prepend=ends.new_zeros(B, 1)).reshape(-1)
        host = lengths.cpu().numpy()  # (the layout's one host sync)
        # a fully valid batch: every place is a member
        order = pixel.view(-1) if int(host.sum()) == B * HW else _compress(pixel.view(-1), valid_at.view(-1))
        groups = [4 ** (levels - 1 - lvl) for lvl in range(levels)]
        return cls(order, lengths, groups, valid.numel(), B, host_lengths=host)

    @classmethod
    def from_sorted(
        cls,
        order: Tensor,
        start: Tensor,
        length: Tensor,
        levels: int,
        values: Tensor | None = None,
        num_valid: int | None = None,
    ) -> RunLayout:
        """DR/DP: finest bins as runs of each image's pixels in depth order.

        Args:
            order: ``(B, P)`` int32/int64, the pixel (within its image) at each sorted place.
            start: ``(B, K)`` first place of each finest bin; bins ascend and do not overlap.
            length: ``(B, K)`` pixels per finest bin.
            levels: ``L``, with ``K = 2**(L-1)``.
            values: ``(B, P)`` the target's values in this order, if they are what the loss
                compares with: then the target in run order is read from them, and its
                medians are the runs' middle members.
            num_valid: valid pixels (some may be in no bin).
        """
        B, P = order.shape
        K = length.shape[1]
        dev = order.device
        host_start, host_length = torch.stack([start, length.to(start.dtype)]).cpu().numpy()  # (one host sync)
        host_end = host_start + host_length
        dtype = torch.int32 if B * P < 2**31 else torch.int64
        pixel = order.to(dtype) + (torch.arange(B, device=dev, dtype=dtype) * P).unsqueeze(1)
        first, last = host_start[:, :1], host_end[:, -1:]
        if not (host_start[:, 1:] == host_end[:, :-1]).all():
            # places inside a run: +1 at each start, -1 at each end, a running sum
            delta = torch.zeros(B, P + 1, dtype=torch.int32, device=dev)
            delta.scatter_add_(1, start, torch.ones_like(start, dtype=torch.int32))
            delta.scatter_add_(1, start + length, torch.full_like(start, -1, dtype=torch.int32))
            inside = torch.cumsum(delta[:, :P], dim=1, dtype=torch.int32) > 0
        elif (first == 0).all() and (last == P).all():
            inside = None  # the runs tile every image's places: every pixel is a member
        else:  # (consecutive runs: one range of places per image)
            place = torch.arange(P, device=dev, dtype=torch.int32)
            lo, hi = (torch.as_tensor(v, device=dev, dtype=torch.int32) for v in (first, last))
            inside = (place >= lo) & (place < hi)
        if inside is None:
            flat, laid = pixel.view(-1), None if values is None else values.reshape(-1)
        else:
            flat = _compress(pixel.view(-1), inside.view(-1), ranges=True)
            laid = None if values is None else _compress(values.reshape(-1), inside.view(-1), ranges=True)
        groups = [2 ** (levels - 1 - lvl) for lvl in range(levels)]
        return cls(
            flat, length.reshape(B * K), groups, B * P, B, num_valid, laid, values is not None,
            host_lengths=host_length.reshape(B * K),
        )


def _compress(x: Tensor, keep: Tensor, ranges: bool = False) -> Tensor:
    """``x[keep]`` for flat ``x`` and bool ``keep``. On CPU in NumPy (:func:`numpy.compress`
    is three times faster than :meth:`torch.Tensor.masked_select`), or, with ``ranges``
    (``keep`` is a few long ranges of True), by NumPy's boolean indexing, which copies
    whole ranges: twice as fast again there, but several times slower on scattered masks."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy()[keep.numpy()] if ranges else np.compress(keep.numpy(), x.numpy()))
    return x.masked_select(keep)


@functools.lru_cache(maxsize=8)
def _quadtree_places(H: int, W: int, cells: int) -> tuple[Tensor, Tensor]:
    """One ``H x W`` image's pixels in DS quadtree order.

    Cells are the bounds of docs/semantics.md §3 (``int(i * w * size)``, ``w = 1 / cells``),
    ordered by interleaving the bits of their row and column (the row's first, coarsest
    level first), so that the ``4**k`` finest cells of every coarser cell are consecutive;
    pixels row-major within a cell.

    Returns:
        ``(H * W,)`` int64, the pixel (``r * W + c``) at every place, and ``(cells**2,)`` the
        last place of every finest cell in quadtree order."""
    def bounds(size: int) -> list[int]:
        return [int(i * (1 / cells) * size) for i in range(cells + 1)]

    rb, cb = bounds(H), bounds(W)
    bits = max(cells.bit_length() - 1, 0)
    rank = [[0] * cells for _ in range(cells)]
    for r in range(cells):
        for c in range(cells):
            rank[r][c] = sum((((r >> b) & 1) << (2 * b + 1)) | (((c >> b) & 1) << (2 * b)) for b in range(bits))
    by_rank = sorted((rank[r][c], r, c) for r in range(cells) for c in range(cells))
    pieces, ends, done = [], [], 0
    pixel = torch.arange(H * W).view(H, W)
    for _, r, c in by_rank:
        block = pixel[rb[r] : rb[r + 1], cb[c] : cb[c + 1]].reshape(-1)
        pieces.append(block)
        done += block.numel()
        ends.append(done - 1)
    # an empty cell (a grid finer than the image is refused earlier) would end where the last did
    return torch.cat(pieces), torch.tensor(ends, dtype=torch.int64).clamp(min=0)


_BLOCK = 64  # entries per block of :func:`segment_sums`


class _Bounds:
    """The run bounds of :func:`segment_sums` on one device: for each bound ``p`` (every
    run's start, then the last run's end), its block ``p // 64`` and the mask of the block's
    first ``p % 64`` entries."""

    def __init__(self, lengths: np.ndarray, device):
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.total = int(bounds[-1])
        self.block = torch.as_tensor(bounds // _BLOCK, device=device)
        column = torch.arange(_BLOCK, device=device)
        self.head = column.unsqueeze(0) < torch.as_tensor(bounds % _BLOCK, device=device).unsqueeze(1)


def segment_sums(x: Tensor, bounds: _Bounds, float64: bool = False) -> Tensor:
    """Sums of the consecutive runs of ``x`` (``(M,)``), as accurate as a pairwise sum.

    ``x`` is cut into blocks of 64 entries; the blocks are summed (pairwise, in ``x``'s
    dtype) and their running sum, in float64, gives ``F(p) = sum(x[:p])`` at the block bounds; a bound inside a block adds
    the block's first ``p % 64`` entries. A run's sum is ``F(end) - F(start)``: one pass over
    ``x`` and a few entries per run, the same on every device.

    Args:
        x: ``(M,)``.
        bounds: the runs' bounds (:class:`_Bounds`).

        float64: return the sums in float64 (to accumulate them further) instead of in
            ``x``'s dtype.

    Returns:
        ``(S,)`` in ``x``'s dtype (empty runs sum to 0)."""
    M = x.numel()
    full = M // _BLOCK
    blocks = x[: full * _BLOCK].view(full, _BLOCK)
    running = torch.zeros(full + 2, dtype=torch.float64, device=x.device)
    torch.cumsum(blocks.sum(1).to(torch.float64), 0, out=running[1 : full + 1])
    # the bounds' blocks (the last, partial block of x padded with zeros)
    tail = x.new_zeros(1, _BLOCK)
    tail[0, : M - full * _BLOCK] = x[full * _BLOCK :]
    rows = torch.cat([blocks, tail]).index_select(0, bounds.block) if full < 64 else _block_rows(blocks, tail, bounds.block)
    partial = (rows * bounds.head).sum(1).to(torch.float64)
    prefix = running.index_select(0, bounds.block) + partial
    sums = torch.diff(prefix)
    return sums if float64 else sums.to(x.dtype)


def _block_rows(blocks: Tensor, tail: Tensor, block: Tensor) -> Tensor:
    """Rows ``block`` of ``blocks`` with ``tail`` appended, without copying ``blocks``."""
    inside = block < blocks.shape[0]
    rows = blocks.index_select(0, block.clamp(max=blocks.shape[0] - 1))
    return torch.where(inside.unsqueeze(1), rows, tail)


_PIECE = 2**19
"""Members per piece of a level's passes on CPU (2 MiB of float32): every per-member pass of
a level runs piece by piece, so that its temporaries are piece-sized, not ``(M,)``. (Meant
also to keep them in the cache; on the 2-core machine that built it, this measured no faster
than one piece, within the noise, and 1.5-4 MB lower in peak memory at B=8, 384x384.)
Other devices take a level in one piece."""


class _Piece:
    """Members ``[a, b)`` of one level and the runs ``r0 .. r1 - 1`` that overlap them.

    Where the level's runs all have length ``w``, a piece is whole runs, seen as a
    ``(r1 - r0, w)`` matrix; otherwise it is a flat range whose first and last runs may be
    cut, ``counts`` of their members inside it.
    """

    def __init__(self, level: _Level, a: int, b: int, r0: int, r1: int, counts: np.ndarray | None):
        self.level, self.a, self.b, self.r0, self.r1 = level, a, b, r0, r1
        self.counts = counts
        self.bounds = None if counts is None else _Bounds(counts, level.device)

    def view(self, x: Tensor) -> Tensor:
        """The piece's members of ``x`` (``(M,)``): ``(r1 - r0, w)`` or ``(b - a,)``."""
        xc = x[self.a : self.b]
        return xc.view(self.r1 - self.r0, -1) if self.counts is None else xc

    def expand(self, v: Tensor) -> Tensor:
        """A per-run value ``v`` (``(S_l,)``) for the piece's members, broadcastable with
        :meth:`view`."""
        vr = v[self.r0 : self.r1]
        if self.counts is None:
            return vr.unsqueeze(1)
        if _numpy_kernels(v):
            return torch.from_numpy(np.repeat(vr.numpy(), self.counts))
        return v.index_select(0, self.level.seg[self.a : self.b])

    def sums(self, x: Tensor) -> Tensor:
        """float64 ``(r1 - r0,)`` sums of ``x`` (a :meth:`view`) over each run's members here."""
        if self.counts is None:
            return x.sum(1).double()
        return segment_sums(x, self.bounds, float64=True)

    def add_to(self, total: Tensor, x: Tensor) -> None:
        """``total[r0:r1] += sums(x)``: the piece's share of per-run float64 sums."""
        total[self.r0 : self.r1] += self.sums(x)


class _Level:
    """One level's runs, their length classes for the selections, and their pieces.

    Per-member passes run over :class:`_Piece` s. Where every run of the level has the same
    length ``w`` (a fully valid image cut into equal cells), a piece is a ``(rows, w)`` view
    and every per-run operation a row operation. Otherwise a per-run value reaches the
    members by :func:`numpy.repeat` on CPU (a memset per run) or by a gather of the members'
    run ids elsewhere, and runs sum by :func:`segment_sums`."""

    def __init__(self, layout: RunLayout, level: int):
        n = layout.level_lengths(level)
        self.n = n
        self.size = n.size
        self.starts = np.cumsum(n) - n
        dev = layout.order.device
        self.device = dev
        self.n_t = torch.as_tensor(n, device=dev)
        self.n1 = torch.as_tensor(n + 1, dtype=torch.float64, device=dev)  # the scales' n + 1
        self.starts_t = torch.as_tensor(self.starts, device=dev)
        self.num_members = layout.num_members
        self.width = int(n[0]) if n.size and n[0] > 0 and bool((n == n[0]).all()) else 0
        self._layout, self._level = layout, level
        self._seg: Tensor | None = None
        self.pieces = self._make_pieces(_PIECE if dev.type == "cpu" else max(self.num_members, 1))
        # length classes (2**(k-1) < n <= 2**k), each as wide as its longest run; the
        # padding a row needs on either side (``slack``) is below a quarter of its width
        self.classes: list[tuple[int, Tensor, Tensor, Tensor]] = []
        self.slack = 0
        if self.width:
            return
        full = n > 0
        k = np.zeros(n.size, dtype=np.int64)
        k[full] = np.ceil(np.log2(n[full])).astype(np.int64)
        for key in np.unique(k[full]):
            rows = np.flatnonzero(full & (k == key))
            width = int(n[rows].max())
            self.slack = max(self.slack, (width - int(n[rows].min())) // 2 + 1)
            r = torch.as_tensor(rows, device=dev)
            self.classes.append((width, r, self.n_t.index_select(0, r), self.starts_t.index_select(0, r)))

    def _make_pieces(self, size: int) -> list[_Piece]:
        """The level's members in pieces of about ``size``: whole rows where the runs have
        one length, else ranges ``[k * size, (k + 1) * size)`` with the runs they cut."""
        M, n = self.num_members, self.n
        if not M:
            return []
        if self.width:
            rows = max(1, size // self.width)
            return [
                _Piece(self, r0 * self.width, min(r0 + rows, self.size) * self.width, r0, min(r0 + rows, self.size), None)
                for r0 in range(0, self.size, rows)
            ]
        size = max(_BLOCK, size // _BLOCK * _BLOCK)
        starts, ends = self.starts, self.starts + n
        pieces = []
        for a in range(0, M, size):
            b = min(a + size, M)
            r0 = int(np.searchsorted(ends, a, side="right"))  # the first run ending after a
            r1 = int(np.searchsorted(starts, b, side="left"))  # the first run starting at b or later
            counts = np.minimum(ends[r0:r1], b) - np.maximum(starts[r0:r1], a)
            pieces.append(_Piece(self, a, b, r0, r1, np.maximum(counts, 0)))
        return pieces

    @property
    def seg(self) -> Tensor:
        """``(M,)`` the run of every member (made once per level and call)."""
        if self._seg is None:
            self._seg = self._layout.segment_ids(self._level)
        return self._seg

    def rows(self, x: Tensor) -> Tensor:
        """``(M,)`` -> ``(S_l, w)`` view (equal run lengths only)."""
        return x.view(self.size, self.width)

    def first_position(self, x: Tensor, value: Tensor) -> Tensor:
        """``(S_l,)`` the run-order position of the first member of every run equal to its
        ``value`` (which is a member's value), ``M`` for an empty run (NumPy, CPU)."""
        hits = np.flatnonzero(x.numpy() == np.repeat(value.numpy(), self.n))
        first = hits[np.minimum(np.searchsorted(hits, self.starts), max(hits.size - 1, 0))] if hits.size else self.starts
        return torch.from_numpy(np.where(self.n > 0, first, self.num_members).astype(np.int64))

    def lower_medians(
        self, values: list[tuple[Tensor, Tensor, int, tuple[Tensor, Tensor] | None]], want_position: list[bool]
    ) -> list[tuple[Tensor, Tensor | None]]:
        """The lower median of every run, and the run-order position of the first member
        holding it (the gradient's median pixel), for several tensors.

        Equal runs are selected as rows. Otherwise each length class is copied into a
        ``(rows, width)`` matrix of windows of the run order: row ``j`` holds the run's
        ``n_j`` members after ``b_j = (width - 1) // 2 - (n_j - 1) // 2`` entries below every
        member and before entries above every member (distinct values: introselect slows
        down tenfold on rows of one repeated value), so that the lower median of every row
        is its middle entry.

        Args:
            values: per tensor ``(extended, x, slack, bounds)``: ``x`` the ``(M,)`` members in
                run order, a view of ``extended`` with ``slack >= self.slack`` entries on each
                side; ``bounds``: ``torch.aminmax(x)`` if known (every level needs it).
            want_position: per tensor, whether the median's position is wanted.

        Returns:
            per tensor ``(median (S_l,), position (S_l,) int64 or None)``; an empty run gets
            median 0 and position ``M`` (one past the members)."""
        out = []
        for (extended, x, slack, bounds), want in zip(values, want_position):
            median = x.new_zeros(self.size)
            in_numpy = _numpy_kernels(x)  # (NumPy's selection reorders the rows in place)
            if self.width:
                matrices = [(None, self.rows(x).clone() if in_numpy else self.rows(x), self.width, self.starts_t)]
            else:
                matrices = []
                if self.classes:
                    lo, hi = torch.aminmax(x) if bounds is None else bounds
                    step = torch.maximum(torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo)) * 2.0**-16
                    ramp = torch.arange(1, self.classes[-1][0] + 1, device=x.device, dtype=x.dtype) * step
                for width, r, n, start in self.classes:
                    below = (width - 1) // 2 - torch.div(n - 1, 2, rounding_mode="floor")
                    rows = extended.unfold(0, width, 1).index_select(0, start - below + slack)
                    _fill_padding(rows, below, n, lo - ramp, hi + ramp)
                    matrices.append((r, rows, width, start - below))
            picked = _select_middle([rows for _, rows, _, _ in matrices])
            position = None
            if want and not in_numpy:
                # the first column of each (unchanged) row holding its median: padding entries
                # lie strictly below or above every member, so the column is a member's
                position = torch.full((self.size,), self.num_members, dtype=torch.int64, device=x.device)
            for (r, rows, _, first_place), value in zip(matrices, picked):
                if r is None:
                    median.copy_(value)
                else:
                    median.index_copy_(0, r, value)
                if position is not None:
                    place = first_place + (rows == value.unsqueeze(1)).to(torch.uint8).argmax(1)
                    if r is None:
                        position.copy_(place)
                    else:
                        position.index_copy_(0, r, place)
            if want and position is None:
                position = self.first_position(x, median)
            out.append((median, position))
        return out


def _select_middle(matrices: list[Tensor]) -> list[Tensor]:
    """The middle entry ``(w - 1) // 2`` (in sorted order) of every row of each ``(R, w)``
    matrix, which the selection may reorder. CPU: NumPy's introselect in place, the rows
    halved between two threads when torch may use two; elsewhere :func:`torch.kthvalue`."""
    if not matrices or not _numpy_kernels(matrices[0]):
        return [torch.kthvalue(m, (m.shape[1] - 1) // 2 + 1, dim=1).values for m in matrices]
    threaded = torch.get_num_threads() > 1 and sum(m.numel() for m in matrices) >= 2**16
    pieces = []  # (array, first row, last row), shared out between the threads by size
    for m in matrices:
        a = m.numpy()
        R = a.shape[0]
        pieces += [(a, 0, R // 2), (a, R // 2, R)] if threaded and R > 1 else [(a, 0, R)]
    share: list[list] = [[], []]
    load = [0, 0]
    for a, first, last in sorted(pieces, key=lambda p: -(p[2] - p[1]) * p[0].shape[1]):
        j = int(load[1] < load[0])
        share[j].append((a, first, last))
        load[j] += (last - first) * a.shape[1]

    def job(j: int) -> None:
        for a, first, last in share[j]:
            a[first:last].partition((a.shape[1] - 1) // 2, axis=1)

    if threaded:
        list(_pool().map(job, (0, 1)))
    else:
        job(0)
        job(1)
    return [m[:, (m.shape[1] - 1) // 2].clone() for m in matrices]


def _fill_padding(rows: Tensor, below: Tensor, n: Tensor, low: Tensor, high: Tensor) -> None:
    """Entries ``[0, below)`` of every row of ``rows`` (``(R, w)``, contiguous) become
    ``low[column]`` and entries ``[below + n, w)`` become ``high[column]``, in one masked
    copy: the entries below the members lie left of the middle column ``(w - 1) // 2``
    (``below <= (w - 1) // 2``), those above right of it (``below + n > (w - 1) // 2``).
    ``low``, ``high``: at least ``w`` entries."""
    R, w = rows.shape
    if not R:
        return
    column = torch.arange(w, device=rows.device)
    fill = torch.where(column <= (w - 1) // 2, low[:w], high[:w])
    end = below + n
    if _numpy_kernels(rows):
        # only the columns where some row has padding: [0, max below) and [min end, w)
        a, col, f = rows.numpy(), column.numpy(), fill.numpy()
        b, e = below.numpy(), end.numpy()
        left, right = int(b.max()), int(e.min())
        if left:
            np.copyto(a[:, :left], f[:left], where=col[:left] < b[:, None])
        if right < w:
            np.copyto(a[:, right:], f[right:], where=col[right:] >= e[:, None])
        return
    outside = (column < below.unsqueeze(1)) | (column >= end.unsqueeze(1))
    rows.copy_(torch.where(outside, fill, rows))


def _sorted_run_medians(x: Tensor, level: _Level) -> tuple[Tensor, Tensor]:
    """Lower medians of runs that ascend: the middle member ``(n - 1) // 2``; position ``M``
    (and median 0) for an empty run."""
    M = x.numel()
    position = torch.where(level.n_t > 0, level.starts_t + torch.div(level.n_t - 1, 2, rounding_mode="floor"), M)
    extended = torch.cat([x, x.new_zeros(1)])
    return extended.index_select(0, position), position


class RunHierarchicalSSI(torch.autograd.Function):
    """HDN's ``"mean"`` aggregation over a :class:`RunLayout`.

    ``forward(pred, target, layout, reduction="mean", image_valid=None)`` with flat ``(N,)``
    inputs, ``pred`` finite. Every member is in exactly one context per level, so its loss
    ``m_i`` is the mean of its ``L`` per-level losses (0 for a pixel that is no member).
    ``reduction``:

    * ``"mean"``: ``sum_i m_i / N_v`` with ``N_v = layout.num_valid``;
    * ``"sum"``: ``sum_i m_i``;
    * ``"per_image"``: ``(B,)``, image ``b``'s ``sum_i m_i / N_v,b`` with ``image_valid[b] = N_v,b``
      (0 for an image without valid pixels);
    * ``"none"``: ``(N,)``, the map ``m``.

    A batch without a valid pixel gives 0 and a zero gradient.
    """

    @staticmethod
    def forward(ctx, pred, target, layout: RunLayout, reduction: str = "mean", image_valid=None):  # type: ignore[override]
        levels = [_Level(layout, lvl) for lvl in range(layout.num_levels)]
        # members in run order, with room on both sides for the selections' windows (the
        # inputs themselves where the layout is the identity and no window needs room)
        M, slack = layout.num_members, max(level.slack for level in levels)
        if layout.identity and not slack:
            P_ext = P = pred
            G_ext = G = target
        else:
            P_ext = pred.new_zeros(M + 2 * slack)
            P = P_ext[slack : slack + M]
            torch.index_select(pred, 0, layout.order, out=P)
            G_ext = pred.new_zeros(M + 2 * slack)
            G = G_ext[slack : slack + M]
            if layout.laid_target is not None:
                G.copy_(layout.laid_target)
            else:  # (members are valid: the target is finite there)
                torch.index_select(target, 0, layout.order, out=G)
        need_p, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        p_bounds = torch.aminmax(P) if M else None  # (for the selections' padding, every level)
        g_bounds = torch.aminmax(G) if M else None
        total = torch.zeros((), dtype=torch.float64, device=pred.device)
        per_image = pred.new_zeros(layout.batch, dtype=torch.float64) if reduction == "per_image" else None
        loss_map = pred.new_zeros(M) if reduction == "none" else None
        saved = []
        for lvl, level in enumerate(levels):
            if layout.target_sorted and not need_g:
                (tp, cp), = level.lower_medians([(P_ext, P, slack, p_bounds)], [need_p])
                tg, cg = _sorted_run_medians(G, level)
            else:
                (tp, cp), (tg, cg) = level.lower_medians([(P_ext, P, slack, p_bounds), (G_ext, G, slack, g_bounds)], [need_p, need_g])
            # scales: sum |x - t| per run, piece by piece
            abs_p = torch.zeros(level.size, dtype=torch.float64, device=pred.device)
            abs_g = torch.zeros_like(abs_p)
            for piece in level.pieces:
                piece.add_to(abs_p, torch.sub(piece.view(P), piece.expand(tp)).abs_())
                piece.add_to(abs_g, torch.sub(piece.view(G), piece.expand(tg)).abs_())
            ip = (abs_p.div_(level.n1).add_(EPS)).reciprocal_().to(pred.dtype)
            ig = (abs_g.div_(level.n1).add_(EPS)).reciprocal_().to(pred.dtype)
            del abs_p, abs_g
            # |p_hat - g_hat| per member, its sums per run, and its sign for the backward
            run_loss = torch.zeros(level.size, dtype=torch.float64, device=pred.device) if loss_map is None else None
            sign = torch.empty(M, dtype=torch.int8, device=pred.device) if need_p or need_g else None
            for piece in level.pieces:
                diff = torch.sub(piece.view(P), piece.expand(tp)).mul_(piece.expand(ip))
                diff.sub_(torch.sub(piece.view(G), piece.expand(tg)).mul_(piece.expand(ig)))
                if sign is not None:
                    piece.view(sign).copy_(diff.sign())
                diff.abs_()
                if loss_map is not None:
                    piece.view(loss_map).add_(diff)
                else:
                    piece.add_to(run_loss, diff)
                del diff
            if run_loss is not None:
                if per_image is not None:
                    per_image += run_loss.view(layout.batch, -1).sum(1)
                else:
                    total += run_loss.sum()
            if sign is not None:
                saved.append((tp, ip, cp, tg, ig, cg, sign))
        L, n_valid = layout.num_levels, layout.num_valid
        if reduction == "mean":
            scale: float | Tensor = 1.0 / (L * n_valid) if n_valid else 0.0
            out = (total * scale).to(pred.dtype)
        elif reduction == "sum":
            scale = 1.0 / L
            out = (total * scale).to(pred.dtype)
        elif reduction == "per_image":
            counts = image_valid.to(pred.dtype)
            scale = torch.where(counts > 0, 1.0 / (L * counts.clamp(min=1)), 0.0)
            out = per_image.to(pred.dtype) * scale
        else:
            scale = 1.0 / L
            out = layout.per_pixel(loss_map).mul_(scale)
        ctx.layout, ctx.levels, ctx.saved, ctx.scale, ctx.reduction = layout, levels, saved, scale, reduction
        ctx.save_for_backward(P if need_p else None, G if need_g else None)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        need_p, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_p or need_g):
            return None, None, None, None, None
        P, G = ctx.saved_tensors
        layout = ctx.layout
        X = P if need_p else G
        M = X.numel()
        # d loss / d |p_hat - g_hat| at every member: one value ("mean", "sum"), one per image
        # ("per_image") or one per member ("none")
        c = grad_output * ctx.scale
        weight = layout.gather(c) if ctx.reduction == "none" else None
        grad_p = X.new_zeros(M + 1) if need_p else None  # (+1: the slot of empty runs' medians)
        grad_g = X.new_zeros(M + 1) if need_g else None
        for lvl, (level, (tp, ip, cp, tg, ig, cg, sign)) in enumerate(zip(ctx.levels, ctx.saved)):
            if weight is not None:
                k = weight  # (M,) per member
            elif c.dim():  # per image: runs are image-major
                k = c.repeat_interleave(level.size // layout.batch)  # (S_l,) per run
            else:
                k = c
            if need_p:
                _normalization_backward(P, level, sign, k, weight is not None, 1.0, tp, ip, cp, grad_p)
            if need_g:
                _normalization_backward(G, level, sign, k, weight is not None, -1.0, tg, ig, cg, grad_g)
        return (
            layout.per_pixel(grad_p[:M]) if need_p else None,
            layout.per_pixel(grad_g[:M]) if need_g else None,
            None,
            None,
            None,
        )


def _normalization_backward(
    x: Tensor,
    level: _Level,
    sign: Tensor,
    k: Tensor,
    per_member: bool,
    factor: float,
    t: Tensor,
    inv: Tensor,
    position: Tensor,
    grad: Tensor,
) -> None:
    """Add the gradient of ``sum_i r_i x_hat_i`` w.r.t. ``x`` over one level's runs to ``grad``,
    with ``r_i = factor * sign_i * k_i`` (``d loss / d x_hat``).

    With ``d = s_x + eps``, ``x_hat_i = (x_i - t) / d`` over a run and
    ``s_x = sum_j |x_j - t| / (n + 1)``:
    ``dL/dx_i = r_i / d + dL/ds_x * sign(x_i - t) / (n + 1)`` directly,
    ``dL/ds_x = -sum_i r_i x_hat_i / d``, and
    ``dL/dt = -sum_i r_i / d - dL/ds_x * sum_i sign(x_i - t) / (n + 1)`` goes to the median
    member (the derivation is in notebook 04). Two passes, piece by piece: the per-run sums
    (keeping ``sign(x_i - t)`` as int8), then the per-member gradient.

    Args:
        x: ``(M,)`` values in run order.
        sign: ``(M,)`` int8 ``sign(p_hat - g_hat)``.
        k: ``d loss / d |p_hat - g_hat|``: a 0-d tensor, ``(S_l,)`` per run, or ``(M,)`` per
            member with ``per_member``.
        factor: 1 for the prediction, -1 for the target.
        t, inv, position: ``(S_l,)`` per-run median, ``1 / d`` and the median member.
        grad: ``(M + 1,)`` accumulator.
    """
    kf = k * factor  # d loss / d x_hat is sign * kf
    kind = "member" if per_member else "run" if k.dim() else "scalar"

    def r_of(piece: _Piece) -> Tensor:
        r = piece.view(sign).to(x.dtype)
        if kind == "member":
            return r.mul_(piece.view(kf))
        return r.mul_(piece.expand(kf) if kind == "run" else kf)

    dtype, dev = torch.float64, x.device
    sum_r = torch.zeros(level.size, dtype=dtype, device=dev)
    sum_rc = torch.zeros_like(sum_r)
    sum_sign = torch.zeros_like(sum_r)
    side = torch.empty(x.numel(), dtype=torch.int8, device=dev)  # sign(x_i - t), for the second pass
    for piece in level.pieces:
        r = r_of(piece)
        centered = torch.sub(piece.view(x), piece.expand(t))
        piece.add_to(sum_r, r)
        piece.add_to(sum_rc, r.mul_(centered))
        centered.sign_()
        piece.view(side).copy_(centered)
        piece.add_to(sum_sign, centered)
    inv64 = inv.to(dtype)
    d_scale_per_n = sum_rc.mul_(inv64).mul_(inv64).neg_().div_(level.n1)  # dL/ds_x / (n + 1)
    d_shift = (-inv64 * sum_r - d_scale_per_n * sum_sign) * (level.n_t > 0)
    d_scale_per_n = d_scale_per_n.to(x.dtype)
    members = grad[:-1]
    for piece in level.pieces:
        r = r_of(piece)
        out = piece.view(members)
        out.addcmul_(piece.view(side).to(x.dtype), piece.expand(d_scale_per_n))
        out.addcmul_(r, piece.expand(inv))
    grad.index_add_(0, position, d_shift.to(x.dtype))
