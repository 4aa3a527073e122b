"""Training: CTC pretraining of the encoders (`ctc`), the AVSR model (`avsr`), resumable checkpoints."""
