"""Experiments that train many models and write their results under ``data/results/``.

- :mod:`hdn.experiments.toy_ablation`: every loss variant x several seeds on the toy split
  (a small reproduction of the paper's ablation, Tables 4-5 of Zhang et al., 2022).
"""
