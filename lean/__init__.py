"""lean: the TorchVision detection fine-tuning tutorial as a fast, resumable pipeline (README.md has the map)."""
