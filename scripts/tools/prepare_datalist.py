"""Build a MONAI datalist (with patient-grouped folds) from an ISLES 2018 or ISLES 2024 CT-perfusion tree, and check
its files (``scripts.data.datalist.build_datalist``).

python -m scripts.tools.prepare_datalist --data_root DIR --output datalist.json --folds 5 --seed 0 [--check]
    [--channels CT,CBF,CBV,MTT,Tmax,CTA]
"""

import json

from scripts.data.channels import CHANNELS
from scripts.flags import as_names
from scripts.safe_files import refuse_existing, write_atomically
from scripts.tools.cli import run

DEFAULT_CHANNELS = ",".join(CHANNELS)


def main(
    data_root: str,
    output: str = "datalist.json",
    folds: int = 5,
    seed: int = 0,
    patients_csv: str | None = None,
    check: bool = False,
    skip_invalid: bool = False,
    overwrite: bool = False,
    channels: str | tuple | list = DEFAULT_CHANNELS,
):
    """CLI: write the datalist of ``data_root`` to ``output``; never replaces an existing file without ``--overwrite``.
    ``--channels`` lists the inputs of each case, the required ones (``scripts.data.channels``) then optional ones,
    e.g. ``CT,CBF,CBV,MTT,Tmax,CTA`` for configs/isles24_cta.json."""
    # imported here, not at the top: the flags are checked before the seconds monai takes to import
    from scripts.data.datalist import build_datalist

    refuse_existing([output], overwrite)
    datalist = build_datalist(data_root, folds, seed, patients_csv, check, skip_invalid, as_names(channels))
    write_atomically(output, lambda f: f.write(json.dumps(datalist, indent=2).encode()))
    print(
        f"{output}: {len(datalist['training'])} training cases in {folds} folds, {len(datalist['testing'])} testing,"
        f" {len(datalist['skipped'])} skipped; median CT voxel size {datalist['median_spacing']} mm (a target_spacing"
        " for configs/isles24_native.json)"
    )


if __name__ == "__main__":
    run(main)
