"""`proscale quickstart`: Mask2Former vs PRO-SCALE on built-in data, end to end, no download.

    proscale quickstart [--out runs/quickstart] [--seeds 2]
    proscale quickstart --task detection     # Deformable DETR vs PRO-SCALE (detection.py)

Stages (each one first checks what OUT already holds, so a re-run resumes instead of starting over):
  1. data      OUT/data: the synthetic panoptic set (train + val, fixed seed; COCO panoptic layout),
               kept when OUT/data/.complete records the same generation parameters.
  2. plan      OUT/plan.json: the fixed recipe (proscale/recipes/small.yaml), the seeds, and the
               `id` (data, recipe, seeds) that stamps every later result. Nothing in it depends on
               this machine's speed or load: the same command gives the same table everywhere.
  3. train     OUT/runs/<model>/seed<k>: every model x seed is an engine training
               (proscale.engine.train) and an evaluation of its model_final.pt (PQ, mask AP, mIoU;
               result.json), one single-threaded process per core (proscale.tradeoff.runs). An
               interrupted run continues from its newest checkpoint; a finished one is kept.
  5. measure   OUT/measure.json: GFLOPs per component (proscale.analysis.flops) and latency (median of
               repeated runs, both models interleaved in one process) of the pixel decoder and the
               whole model, at the training size and a larger one.
  6. report    OUT/report.md, OUT/report.html, OUT/plots/*.png, OUT/overlays/*.png, kept when its
               inputs did not change; then the comparison table (means ± std over seeds) is printed.

The model presets are `m2f_nano` and `proscale_nano_331_conv` (proscale/presets.py; why that
PRO-SCALE setting: proscale/quickstart/config.py, MODELS).

The files, lower floors first:
    config.py        QuickstartConfig, MODELS, where results lie under OUT
    console.py       stage lines and progress bars
    plan.py          stage 2 and the expected duration
    stages.py        stages 1, 3, 5
    tables.py, figures.py    the report's numbers and images
    report.py        stage 6
    detection.py, detection_report.py   the same stages for the detectors (--task detection)
    job.py           run_quickstart and the command
"""
from proscale.quickstart.config import MODELS, QuickstartConfig
from proscale.quickstart.job import add_parser, run_quickstart

__all__ = ["MODELS", "QuickstartConfig", "add_parser", "run_quickstart"]
