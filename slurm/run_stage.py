"""Run one stage task in this process: the entry for hand-written sbatch scripts (without the CLI).

    srun python -m slurm.run_stage pretrain key=value ...           # one srun task per GPU
    srun python -m slurm.run_stage detection --config-file F --output-dir D KEY VALUE ...

Exports the torch.distributed variables from the Slurm step (SLURM_PROCID, SLURM_NTASKS, the first host
of SLURM_JOB_NODELIST) and calls the stage's entry point with the composed config; outside Slurm it runs
one process (or uses the variables torchrun set). See slurm/examples/pretrain.sbatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .errors import SubmitError
from .jobs import DetectionJob, StageJob
from .stages import DETECTION, compose_stage_config, get_stage


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm.run_stage", description=__doc__.split("\n\n")[0])
    p.add_argument("stage")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--config-file", help="detection: detectron2 YAML")
    p.add_argument("--output-dir", help="detection: OUTPUT_DIR of this run")
    args = p.parse_intermixed_args(argv)
    try:
        spec = get_stage(args.stage)
        if spec.kind == DETECTION:
            if not args.config_file or not args.output_dir:
                raise SubmitError("detection needs --config-file F and --output-dir D")
            job = DetectionJob(spec, args.config_file, args.overrides, str(Path(args.output_dir).resolve()))
        else:
            from omegaconf import OmegaConf

            cfg = compose_stage_config(args.stage, args.overrides)
            cfg.run_dir = str(Path(str(cfg.run_dir)).resolve())
            job = StageJob(spec, OmegaConf.to_container(cfg, resolve=True))
    except SubmitError as e:
        print(f"run_stage: error: {e}", file=sys.stderr)
        return 2
    job()
    return 0


if __name__ == "__main__":
    sys.exit(main())
