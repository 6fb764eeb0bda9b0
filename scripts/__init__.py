"""Custom Python of the ISLES 2018 CT-perfusion bundle: the modified UNet and data tooling MONAI lacks."""
