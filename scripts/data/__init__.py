"""Reading the data: the inputs' specification, the ISLES 2018 and 2024 layouts, datalists and folds, the readers,
the pre-processing and the perfusion maps computed from a raw series."""
