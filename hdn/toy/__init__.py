"""The toy training stack of notebook 05: procedural RGB-D data, a small U-Net, a trainer.

- :mod:`hdn.toy.synthetic`: procedural 64 x 64 RGB-D scenes and the committed toy split.
- :mod:`hdn.toy.relief`: 32 x 32 scenes whose near relief is visible as shading (notebook 06).
- :mod:`hdn.toy.models`: the small U-Net.
- :mod:`hdn.toy.train`: the training loop (``python -m hdn.toy.train``).
- :mod:`hdn.toy.experiments`: experiments built on them (the loss ablation; the fine-detail ablation).

It imports the loss library (:mod:`hdn`); the library never imports it.
"""
