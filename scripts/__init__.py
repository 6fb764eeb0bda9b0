"""Custom Python of the ISLES 2018 CT-perfusion bundle: the modified UNet and data tooling MONAI lacks."""

import os

# the bundle's root folder (configs/, models/, scripts/), wherever it is run from
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
