"""The private computational core behind :mod:`hdn`'s losses.

- :mod:`hdn._core.rows`: the *row core*. Nested partitions (DS cells, DR/DP bins, the whole
  image) laid out as padded rows, so every level is a row reduction of one view.
- :mod:`hdn._core.segments`: the general *segment core*. Per-segment medians, sums and counts
  for any contexts (overlapping, pooled, label maps).

Nothing here is public API: call :func:`hdn.hdn_loss`, :func:`hdn.ssi_loss` and
:func:`hdn.contexts_loss` instead. The core imports nothing from the rest of the package.
"""
