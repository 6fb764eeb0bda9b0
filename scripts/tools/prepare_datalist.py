"""Build a MONAI datalist (with patient-grouped folds) from an ISLES 2018 or ISLES 2024 CT-perfusion tree, and check
its files (``scripts.data.folds``).

python -m scripts.tools.prepare_datalist --data_root DIR --output datalist.json --folds 5 --seed 0 [--check] [--cta true]
"""

import json

from scripts.data.folds import build_datalist
from scripts.data.isles18 import CHANNELS
from scripts.flags import as_bool
from scripts.safe_files import refuse_existing, write_atomically
from scripts.tools.cli import run


def main(
    data_root: str,
    output: str = "datalist.json",
    folds: int = 5,
    seed: int = 0,
    patients_csv: str | None = None,
    check: bool = False,
    skip_invalid: bool = False,
    overwrite: bool = False,
    cta: bool = False,
):
    """CLI: write the datalist of ``data_root`` to ``output``; never replaces an existing file without ``--overwrite``.
    ``--cta true`` lists ISLES 2024's CTA as a sixth input (configs/isles24_cta.json)."""
    refuse_existing([output], overwrite)
    channels = CHANNELS + (("CTA",) if as_bool(cta, "cta") else ())
    datalist = build_datalist(data_root, folds, seed, patients_csv, check, skip_invalid, channels)
    write_atomically(output, lambda f: f.write(json.dumps(datalist, indent=2).encode()))
    print(
        f"{output}: {len(datalist['training'])} training cases in {folds} folds, {len(datalist['testing'])} testing,"
        f" {len(datalist['skipped'])} skipped; median CT voxel size {datalist['median_spacing']} mm (a target_spacing"
        " for configs/isles24_native.json)"
    )


if __name__ == "__main__":
    run(main)
