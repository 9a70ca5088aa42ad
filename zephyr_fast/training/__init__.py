"""The trainer, read in call order (each module only calls the ones listed after it):

* ``run.py`` -- one recipe run: setup -> data -> model -> reference log-probs -> train -> save;
* ``loop.py`` -- the optimisation loop and evaluation over the step plan;
* ``stages.py`` -- the objective (SFT, DPO, reference-only) and its registry: tokenising, packing,
  the loss head, the step denominator; ``LossModule``, the packed forward DeepSpeed wraps;
* ``plan.py`` -- packed splits with host-side counts, which micro-batch runs at which step;
* ``reference.py`` -- the offline reference log-prob pass and its keyed cache;
* ``build.py`` -- model, optimiser, LR schedule, DeepSpeed engine;
* ``checkpoint.py``, ``metrics.py``, ``distributed.py`` -- saving / resuming, logged metrics, collectives.

``zephyr_fast/train.py`` is the launch script in front of ``run.py``.
"""
