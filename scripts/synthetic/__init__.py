"""Synthetic data, the default of the demo and the tests: ISLES-like trees, the CT perfusion phantom, DICOM studies."""
