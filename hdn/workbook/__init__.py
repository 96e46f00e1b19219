"""Teaching helpers of the workbook's notebooks: figures, explorers and gradient analysis.

- :mod:`hdn.workbook.plotting`: the workbook's figure conventions (colour maps, invalid pixels).
- :mod:`hdn.workbook.explorer`: per-pixel loss maps, region shares and the context explorer
  widget (notebooks 01-03).
- :mod:`hdn.workbook.gradients`: gradient maps and descent on a depth map (notebook 04).
- :mod:`hdn.workbook.training_explorer`: the level explorer of trained models (notebook 05).
- :mod:`hdn.workbook.figures`: the README's overview figure (``python -m hdn.workbook.figures``).
- :mod:`hdn.workbook.tables`: the aligned text tables and tolerance checks the notebooks print.

The workbook imports the loss library (:mod:`hdn`) and the toy training stack
(:mod:`hdn.toy`); the library never imports the workbook.
"""
