"""Experiments that train many models and write their results under ``data/results/``.

- :mod:`hdn.toy.experiments.toy_ablation`: every loss variant x several seeds on the toy split
  (a small reproduction of the ablation in Sec. 4 of Zhang et al., NeurIPS 2022).
"""
