"""Training: one loop for every model, checkpoints, optimiser schedule, K-1 credit assignment."""
