"""Tests of learners: losses, DPO, TPO, SLHF, RFT, LoRA, guard rails."""
