"""Command line of the synthetic ISLES-like trees (``scripts.synthetic.isles``): ``python -m scripts.tools.synthetic_isles
--output_dir DIR [--layout isles18|isles24|isles24_archive] [--dicom true] [--phantom true] ...``."""

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
    phantom: bool = False,
) -> dict:
    """CLI: a synthetic tree in ``layout``: ``isles18`` (``generate``) or ``isles24`` / ``isles24_archive``
    (``generate_isles24``); ``in_plane`` and ``slices`` default to each release's (256 and 2-22 slice slabs; 512 and
    100 slices); ``--dicom true`` also writes each case's maps as a DICOM study; ``--phantom true`` makes each case a
    CT perfusion phantom (``scripts.synthetic.phantom``) whose maps are computed from its raw series, written beside the
    case (ISLES 2018 ``CT_4DPWI``, ISLES 2024 raw CTP, a DICOM series in the study) with the phantom's truth."""
    # imported here, not at the top: the flags are checked before the seconds monai takes to import
    from scripts.synthetic.isles import generate, generate_isles24
    from scripts.synthetic.phantom import PhantomSource

    source = PhantomSource() if phantom else None
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
            source,
        )
    if isinstance(slices, (tuple, list)):
        raise ValueError("--slices is one slice count for an ISLES 2024 volume")
    return generate_isles24(
        output_dir, num_train, num_test, seed, in_plane or 512, slices or 100, layout, overwrite, dicom, source
    )


if __name__ == "__main__":
    run(main)
