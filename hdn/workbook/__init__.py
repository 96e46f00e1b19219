"""Teaching helpers of the workbook's notebooks: figures, explorers and gradient analysis.

- :mod:`hdn.workbook.plotting`: the workbook's figure conventions (colour maps, invalid pixels,
  DR / DP bins with their depth intervals, DS grids over the depth map).
- :mod:`hdn.workbook.schematic`: the method figures (HDN as a pipeline; a near context
  keeping the relief of a depth profile) of notebook 02.
- :mod:`hdn.workbook.tables`: the SSI statistics written out, per-pixel loss weights and
  their change, region-share tables (notebooks 01-02).
- :mod:`hdn.workbook.explorer`: per-pixel loss maps, region shares and the context explorer
  widget (notebooks 01-03).
- :mod:`hdn.workbook.gradients`: gradient maps and descent on a depth map (notebook 04).
- :mod:`hdn.workbook.training_explorer`: the level explorer of trained models (notebook 05).
- :mod:`hdn.workbook.figures`: the README's overview figure (``python -m hdn.workbook.figures``).
- :mod:`hdn.workbook.tables`: the aligned text tables and tolerance checks the notebooks print.

The workbook imports the loss library (:mod:`hdn`) and the toy training stack
(:mod:`hdn.toy`); the library never imports the workbook.
"""
