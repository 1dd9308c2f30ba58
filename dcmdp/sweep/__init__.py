"""``dcmdp sweep``: a grid of local runs (mismatch source × algorithm × seed), run and aggregated.

A sweep file (kind ``DCMDPSweep``) names a base run, the mismatch sources (each a patch of the
single rollout pool: precision, logit noise, lag) and the algorithms (each a patch of
``spec.algorithm``). Every combination and seed is one *cell*: an ordinary ``DCMDPRun`` manifest,
validated up front, run by the in-process runner (found through the ``dcmdp.runners`` entry point,
so the core never imports the trainer) in a pool of worker processes; a cell with a ``vllm`` pool
runs with the process runner instead, its rollout worker under the vLLM venv (``make vllm-venv``).

* **Shared warm start**: the supervised warm start is run once per seed (or once, with
  ``warmStartSeed``) and its model folder reused by every cell of that seed (``model.path``), so
  cells differ only in what the sweep varies.
* **Relative tolerance**: an algorithm may set ``tolerance: {relativeTo: grpo, factor: 0.5}``: its c
  is ``factor`` × the mean δ̄ that the ``grpo`` cells of the same source measured (mean over their
  steps and seeds). Those reference cells run first; the derived c is written into the cell's
  manifest and ``calibration.json``.
* **Resumable**: a finished cell leaves ``cell.json``; a rerun skips it (an unfinished cell is
  restarted from scratch).
* **Aggregation** (:mod:`dcmdp.sweep.report`): per cell the final held-out accuracy (trainer greedy
  and engine sampled), collapse (the smoothed reward falls below ``collapse.fraction`` of its peak
  after that peak), δ̄, c and λ; per (source, algorithm) mean ± std over seeds; a Table-2-shaped
  markdown table, ``results.json``/``results.csv`` and one PNG per source.

The modules, each one concept, imported in this order (no cycles):
:mod:`~dcmdp.sweep.spec` (the ``DCMDPSweep`` model), :mod:`~dcmdp.sweep.plan` (the grid as
cells: manifests, references), :mod:`~dcmdp.sweep.cells` (a cell's folder and its numbers),
:mod:`~dcmdp.sweep.run` (the scheduler), :mod:`~dcmdp.sweep.plots` and :mod:`~dcmdp.sweep.report`
(aggregation), :mod:`~dcmdp.sweep.cli` (``dcmdp sweep``).
"""
