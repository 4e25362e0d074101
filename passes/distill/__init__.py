"""Layer-wise distillation: refit what compression left float to match the original model."""
