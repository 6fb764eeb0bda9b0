"""Reading the data: the ISLES 2018 and 2024 layouts, datalists and folds, the pre-processing, synthetic trees."""
