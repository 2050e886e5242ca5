"""The transformer learner for supervised online continual learning.

Bornschein, Li, Rannen-Triki, *Transformers for Supervised Online Continual Learning*
(arXiv 2403.01554, 2024): a transformer over the stream of examples that learns in
context (it attends to the last W revealed examples and their labels) and in weights
(one online AdamW step per chunk, Transformer-XL style, with R replay streams).

Tokens come from frozen feature vectors (input LayerNorm + Linear). Two ways to give the
model the labels of past examples (``label_mode``):

- ``"kv"`` (pi-transformer, "privileged information"): one token per example. In every
  layer the key and value of an example's token are a projection of its normalised hidden
  state **plus** a projection of its label embedding; its query and residual stream never
  see a label. The mask is strictly causal (zero diagonal), so a query never meets its own
  label. A learned per-layer "sink" key/value is always attendable, so the very first
  example (empty context) has something to attend to.
- ``"context"`` (2-token): the sequence interleaves an x-token and a y-token (the label
  embedding) per example; causal attention including the diagonal; the loss is taken at
  x-tokens only, and an x-token never sees its own y-token (it comes right after it).

Labels not yet revealed (the chunk being predicted) use an extra "unknown" label, index K
(zero-initialised: it adds nothing to keys/values in kv mode). ``predict`` builds the
chunk's tokens with the unknown label; ``update`` uses the true labels (teacher forcing,
as in Transformer-XL training). With C = 1 the two are identical (an example's own label
is masked from its own query anyway). With C > 1 they differ: in ``update`` example i of
a chunk sees the true labels of examples j < i of the same chunk, in ``predict`` it sees
"unknown" there, a label the default update never trains. So C > 1 trades some accuracy
inside each chunk for throughput; the cached past always carries true labels.

Memory (Transformer-XL): each chunk attends causally to itself and to the cached,
detached keys/values of the last W examples before it (:mod:`.kv_cache`), so
a query late in a chunk sees up to W + C - 1 earlier examples (W = 0: only its own chunk).
Results do not depend on the ring's slot order or wrap-around: incremental processing equals
one cache-free forward with the matching block-banded mask (``q_lo``, used by the tests).
Positions are relative: ALiBi biases ``-slope_h * distance_in_examples``, so any stream
length works. Replay (:mod:`.replay`): stream 0 is the newest chunk; streams
1..R-1 walk over the revealed history with their own caches; one forward and one AdamW
step per chunk cover all streams at once (the batch dimension is the stream; the newest chunk
weighs ``stream0_weight`` = 1/2 of the loss, the replay streams share the rest). A chunk whose
loss is not finite is skipped (counted in ``skipped_updates``) and kept out of the history.

Cost of a step (one chunk): one training forward over the R streams, one backward, one
AdamW step over all parameters kept in flat buffers (:mod:`.flat_adamw`: one
norm for clipping, one fused kernel per group), and, when C > 1 or in context mode, a
gradient-free forward of stream 0 for ``predict``. With C = 1 in kv mode ``predict`` runs
the training forward itself and ``update`` reuses it: labels cannot change what it computes
(see :meth:`TransformerLearner.shares_forward`). On a GPU, ``cuda_graph`` replays predict and
the whole training step as captured CUDA graphs (:mod:`.cuda_graphs`).

CPU note: the per-example loop runs many tiny kernels; intra-op threads only add overhead
(on a busy 2-core machine ``torch.set_num_threads(1)`` was 10x faster than 2 threads).

Segments (``segment`` = G > 1, Transformer-XL training): ``predict`` is a gradient-free forward
over stream 0's cache, which ``update`` fills with the revealed examples' keys/values (labels in);
every G examples one step learns from segments of G consecutive examples per stream, whose
tokens attend causally to each other with gradients: the only way keys, values and the label
projection learn (at G = 1, C = 1 a query attends to detached cache entries only). The cache then
holds W + G - 1 examples and ``q_lo`` keeps every query to the context it is predicted with.

Copy read-out (``copy``): the head's distribution is mixed with the labels the last layer's
attention weighs (cached examples keep their labels, :attr:`.kv_cache.KVCache.labels`), with a
learned gate and learned head weights: in-context prediction from the first example (recency
through ALiBi before any training), sharpened by training (see
:meth:`.model.OnlineTransformer.copy_readout`). ``copy_recency`` (on by default) lets it learn
how steep that recency is, per head.

Prediction: the network's distribution (with ``copy``, mixed with the copied labels), calibrated
by a learned output temperature (``temperature``), nothing else. Pooling it with other learners of the same features (an
online linear read-out, streaming LDA, ...) is the pooled learner's job
(:mod:`ocl.learners.pooled`, ``learner=pooled``), which uses this learner through the
:class:`~ocl.learners.base.Learner` interface only.

Modules: :mod:`.model` (the options and the network), :mod:`.learner` (the learner),
:mod:`.kv_cache` (the ring-buffer cache), :mod:`.replay` (the replay cursors; the history they
read is :class:`ocl.learners.memory.History`),
:mod:`.flat_adamw` (the optimizer), :mod:`.cuda_graphs` (captured steps on a GPU).
"""

from ocl.learners.transformer.learner import TransformerLearner
from ocl.learners.transformer.model import OnlineTransformer, TransformerConfig, alibi_slopes, split_heads

__all__ = ["OnlineTransformer", "TransformerConfig", "TransformerLearner", "alibi_slopes",
           "split_heads"]
