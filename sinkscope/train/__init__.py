"""Training: the one loop (`loop`), losses (`losses`), the model families (`avsr`, `ctc`), resumable checkpoints
(`checkpoint`), sweeps (`sweep`) and result tables (`results`)."""
