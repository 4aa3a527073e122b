"""Training: CTC pretraining of the encoders (and, later, the AVSR model)."""
