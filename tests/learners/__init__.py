"""Tests of orchestrator.learners: losses, DPO, TPO, SLHF, RFT, LoRA, guard rails."""
