"""Analyses of the thesis: soft-label entropy against temperature, transfer-set selection,
noise in soft labels, penultimate-layer projections, the batch-size sweep, and their plots."""
