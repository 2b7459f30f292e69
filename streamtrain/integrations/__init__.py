"""What loops written for torch.optim need to drive the engine (HF Trainer: integrations.transformers)."""
