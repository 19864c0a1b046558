"""`proscale quickstart`: Mask2Former vs PRO-SCALE on built-in data, end to end, no download.

    proscale quickstart [--out runs/quickstart] [--budget-minutes 6.5]

Stages (each one first checks what OUT already holds, so a re-run resumes instead of starting over):
  1. data      OUT/data: the synthetic panoptic set (train + val, fixed seed; COCO panoptic layout),
               kept when OUT/data/.complete records the same generation parameters.
  2. plan      OUT/plan.json: iterations per model. Both models get the same iterations, batch, data
               order and seed. The number is the recipe's (`max_iterations`) unless the time budget
               cannot hold it: then a short timing of both models on this machine lowers it. Kept
               for the same data and settings (pass --iterations to choose the number yourself).
               Its `id` (data, settings, iterations) stamps every later result.
  3. train     OUT/runs/<model>: proscale.engine.train (metrics.jsonl, periodic checkpoints,
               model_final.pt). An interrupted run continues from its newest checkpoint (the
               engine's resume); a finished one of this plan is not touched; one of another plan is
               cleared first.
  4. evaluate  OUT/eval/<model>.json: PQ (things / stuff), mask AP and mIoU on the val split.
  5. measure   OUT/measure.json: GFLOPs per component (proscale.analysis.flops) and latency (median of
               repeated runs, both models interleaved in one process) of the pixel decoder and the
               whole model, at the training size and a larger one.
  6. report    OUT/report.md, OUT/report.html, OUT/plots/*.png, OUT/overlays/*.png, kept when its
               inputs did not change; then the comparison table is printed.

The model presets are `m2f_nano` and `proscale_nano_333` (proscale/presets.py); the data, training
and inference settings that make them learn on a CPU in minutes are the fields of
`QuickstartConfig`, each with the reason for its value. CPU by default (threads: see
`plan.auto_threads`); a GPU is used when one is present (`--device`).

The files, lower floors first:
    config.py        QuickstartConfig, MODELS, where results lie under OUT
    console.py       stage lines and progress bars
    train_config.py  the engine's TrainConfig of one model
    plan.py          stage 2 and the CPU thread choice
    stages.py        stages 1, 3, 4, 5
    tables.py, figures.py, html.py    the report's numbers, images and HTML page
    report.py        stage 6
    job.py           run_quickstart and the command
"""
from proscale.quickstart.config import MODELS, QuickstartConfig
from proscale.quickstart.job import add_parser, run_quickstart

__all__ = ["MODELS", "QuickstartConfig", "add_parser", "run_quickstart"]
