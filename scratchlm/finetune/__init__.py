"""Post-training: supervised fine-tuning, LoRA, DPO, classification and the human-feedback loop."""
