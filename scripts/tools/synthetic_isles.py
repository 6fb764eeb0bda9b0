"""Command line of the synthetic ISLES-like trees (``scripts.data.synthetic``): ``python -m scripts.tools.synthetic_isles
--output_dir DIR [--layout isles18|isles24|isles24_archive] [--dicom true] ...``."""

from scripts.data.synthetic import generate, generate_isles24
from scripts.tools.cli import run


def main(
    output_dir: str,
    layout: str = "isles18",
    num_train: int = 20,
    num_test: int = 4,
    seed: int = 0,
    in_plane: int | None = None,
    slices: int | tuple | list | None = None,
    two_slab_fraction: float = 0.3,
    overwrite: bool = False,
    dicom: bool = False,
) -> dict:
    """CLI: a synthetic tree in ``layout``: ``isles18`` (``generate``) or ``isles24`` / ``isles24_archive``
    (``generate_isles24``); ``in_plane`` and ``slices`` default to each release's (256 and 2-22 slice slabs; 512 and
    100 slices); ``--dicom true`` also writes each case's maps as a DICOM study."""
    if layout == "isles18":
        return generate(
            output_dir,
            num_train,
            num_test,
            seed,
            in_plane or 256,
            slices or (2, 4, 8, 16, 22),
            two_slab_fraction,
            overwrite,
            dicom,
        )
    if isinstance(slices, (tuple, list)):
        raise ValueError("--slices is one slice count for an ISLES 2024 volume")
    return generate_isles24(
        output_dir, num_train, num_test, seed, in_plane or 512, slices or 100, layout, overwrite, dicom
    )


if __name__ == "__main__":
    run(main)
