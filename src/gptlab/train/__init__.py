"""The training stage: prepared shards + a model config -> a run directory with checkpoints, metrics and plots.

    train(cfg, resume=False) -> summary dict       the run directory is cfg.train.run_dir
    resume_config(run_dir, overrides) -> Config     what `gptlab train --resume RUN` trains with

Loading a trained run back is gptlab.runs (load_run); the device, precision and peak FLOP/s are gptlab.device.
"""

from gptlab.train.trainer import resume_config, train

__all__ = ["resume_config", "train"]
