"""Model merging: one model from experts fine-tuned from a shared start, on ``state_dict``\\ s.

* :func:`task_arithmetic` — ``theta0 + sum_k scale_k (theta_k - theta0)`` (Ilharco et al. 2023);
* :func:`ties` — trim, elect sign, disjoint mean (Yadav et al. 2023);
* :func:`fisher_merge` — ``sum_k F_k theta_k / sum_k F_k`` per element (Matena & Raffel 2022),
  the anchor of a separate-mode EWC, on the fused consolidate op;
* :func:`weight_matching` (with :func:`mlp_chain`) — permutation alignment before merging
  (Ainsworth et al. 2023): one model relabelled unit by unit to match another;
* :func:`learn_merge` — task- or layer-wise coefficients trained with ``cl_optim.SAM`` against the
  experts' outputs (AdaMerging with ``rho=0``; SAMerging with the second pass at the perturbed
  merge).

Every function takes ``state_dict``\\ s and returns a new one; nothing is modified in place. Only
floating-point entries are merged; the others (BatchNorm's ``num_batches_tracked``) are copied
from the first model.
"""

from .align import mlp_chain, weight_matching
from .arithmetic import task_arithmetic
from .fisher import fisher_merge
from .learned import learn_merge
from .ties import ties

__all__ = ["fisher_merge", "learn_merge", "mlp_chain", "task_arithmetic", "ties", "weight_matching"]
