"""Labelled image data for the experiments, pretraining and the demo: datasets (npz and image-folder
loaders, conversion to the challenge's form), sources (a suite's `sources` entries as targets to
sample from) and sampling (few-shot tasks after the MedIMeta protocol). The demo's sample
(pbc_blood_cells.npz, its manifest.json and SOURCE.md) lives beside them and ships as package data."""
