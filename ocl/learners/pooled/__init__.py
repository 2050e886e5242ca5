"""The pooled learner: any learners of the same features (its *experts*) combined online.

``learner=pooled`` runs the experts side by side on the stream: each predicts every chunk, a
pool combines their predictive distributions, and after the labels are revealed the pool
learns how each expert scored the chunk, then every expert learns it exactly as it would
alone. Pooling lets experts that learn at different speeds cover for each other: an online
linear read-out learns a new class within tens of examples, streaming LDA is strong on
stationary streams, the transformer's network (``learner=transformer``) catches up after
hundreds of steps and then exploits its context.

- Experts (``experts``, :mod:`.experts`): shipped learners by name, or mappings with options
  or a ``_target_`` (a plug-in learner); an expert whose probabilities are badly calibrated
  (SLDA by default) gets an online temperature of its own (:class:`.experts.Calibrated`).
- The pool (``pool``, :mod:`.pools`): ``loglinear``, a product of experts whose exponents take
  one Adam step per scored chunk, or ``fixed_share``, a Bayesian mixture that follows whichever
  expert predicted best recently.
- Held-out predictions (``evaluate``: test sets, near-future accuracy) use a second pool fitted
  on held-out scores of the experts (``heldout_mixture``, ``heldout_scores``, :mod:`.heldout`).

Prequential: the pools learn only from chunks already scored (and from revealed past examples),
and the experts are used through the :class:`~ocl.learners.base.Learner` interface only
(``predict``, ``update``, ``evaluate``, ``frozen``).

Shipped pools: ``configs/learner/pooled.yaml`` (transformer + linear + SLDA, the default learner
of ``ocl run``) and ``configs/learner/readout_pool.yaml`` (linear + SLDA: what the pool does
without the network).

Modules: :mod:`.learner` (the learner), :mod:`.experts` (resolving ``experts``, calibration),
:mod:`.pools` (the pools), :mod:`.heldout` (the held-out pool).
"""

from ocl.learners.pooled.learner import PooledLearner
from ocl.learners.pooled.pools import FixedShare, LogLinearPool

__all__ = ["FixedShare", "LogLinearPool", "PooledLearner"]
