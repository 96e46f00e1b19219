"""Experiments that train many models and write their results under ``data/results/``.

- :mod:`hdn.toy.experiments.toy_ablation`: every loss variant x several seeds on the toy split
  (a small reproduction of the ablation in Sec. 4 of Zhang et al., NeurIPS 2022).
- :mod:`hdn.toy.experiments.fine_detail`: the pre-registered fine-detail ablation of notebook 06
  (rows in ``results/fine_detail.jsonl``, shipped as package data).
"""
