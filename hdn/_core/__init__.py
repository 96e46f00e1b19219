"""The private computational core behind :mod:`hdn`'s losses.

:mod:`hdn._core.engine`: one engine for every kind of context. A level of contexts is data (a
segment id per pixel or per (pixel, context) pair); medians, scales, the normalised residuals,
their per-pixel mean and the reductions are computed from it with fixed shapes and no host
sync. Nothing here is public API: call :func:`hdn.hdn_loss`, :func:`hdn.ssi_loss` and
:func:`hdn.contexts_loss`. The core imports nothing from the rest of the package.
"""
