"""The private computational core behind :mod:`hdn`'s losses.

- :mod:`hdn._core.runs`: the *run core*. Nested partitions (DS cells, DR/DP bins, the whole
  image) as contiguous runs of one pixel order, so every context of every level is a run:
  segment sums, and one row selection per length class of runs.
- :mod:`hdn._core.segments`: the general *segment core*. Per-segment medians, sums and counts
  for any contexts (overlapping, pooled, label maps).

Nothing here is public API: call :func:`hdn.hdn_loss`, :func:`hdn.ssi_loss` and
:func:`hdn.contexts_loss` instead. The core imports nothing from the rest of the package.
"""
