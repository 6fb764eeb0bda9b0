"""Loading a case, and checking it as it is loaded, so that each file is read once per run.

``LoadCased`` is MONAI's ``LoadImaged`` for one datalist item (``image``: the channels' files in order, or one 4D file;
``label``; ``case``; ``maps_source``): for each key it picks, as ``LoadImage`` does, the first of its readers whose
``verify_suffix`` takes the key's value (the reader registry, as nnU-Net's ``imageio``): ``CheckedNiftiReader``
for NIfTI files, and the readers a profile adds (configs/dicom.json: ``scripts.dicom.series.DicomSeriesReader`` for
DICOM series). With ``check`` every file is checked as it is read (a ``.gz`` stream against its CRC, a map's
dimensions, one grid for all the files of a case, values that are NaN/Inf as float32 or beyond ``MAX_ABS_VALUE``, a
binary label, and in training no blank perfusion map), and a problem stops the run with one ``InvalidCaseError``
naming the case and the file. ``scripts.data.datalist`` runs the same load outside a pipeline (``prepare_datalist
--check``, and before inference and evaluation).

A case whose ``maps_source`` is ``COMPUTED_MAPS`` (the layout readers decide it: a case with the raw CT perfusion series
and no vendor maps) names that series as the file of each ``computed`` channel (``scripts.data.channels``): it is read
once, its maps computed (``scripts.data.perfusion_maps``: oSVD, in ISLES 2018's units, ``isles18_maps``) and
resampled onto the NCCT's grid where they are not on it, and they take those channels' places in the image; a series
the maps cannot be computed from stops the run with one ``InvalidCaseError`` naming the case and the file.
"""

from __future__ import annotations

import gzip
import os
import zlib

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import LoadImaged, MapTransform, SpatialResample
from monai.utils import PostFix, ensure_tuple
from scripts.data import perfusion_maps
from scripts.data.channels import CHANNELS, COMPUTED_MAPS, MAPS_SOURCE, NCCT, VENDOR_MAPS, computed_channels
from scripts.data.files import NIFTI_SUFFIXES, InvalidCaseError, file_stem
from scripts.monai_gaps import LoadImageWithGivenReader, ThreadSafeNibabelReader

__all__ = ["MAX_ABS_VALUE", "CheckedNiftiReader", "InvalidCaseError", "LoadCased", "computed_positions", "onto_grid"]

# Largest magnitude accepted in a map or label, after the header's scaling. No CT (HU), perfusion map or label value
# comes near it; beyond it lie "no value" markers such as FLT_MAX (3.4e38), and a float32 z-score over a slab with such
# a value loses the rest of the map (beyond about 1e19 its sum of squares overflows to Inf, and the input to NaN).
MAX_ABS_VALUE = 1e6
LABEL = "OT"  # how messages name a case's label (ISLES's name for it)


class FileProblem(ValueError):
    """What is wrong with one file, raised by a reader; ``LoadCased`` names the case and the channel."""

    def __init__(self, path, problem, unreadable=False):
        super().__init__(path, problem, unreadable)
        self.path, self.problem, self.unreadable = str(path), problem, unreadable

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"

    def for_case(self, case, name) -> InvalidCaseError:
        """The error to raise: ``<case>: <name> file <path> <problem>``."""
        if self.unreadable:
            return InvalidCaseError(f"{case}: cannot read {name} file {self.path}: {self.problem}")
        return InvalidCaseError(f"{case}: {name} file {self.path} {self.problem}")


def _read_nifti(path):
    """The NIfTI image of ``path``, its file read once. A ``.gz`` file is decompressed whole in memory first, which
    checks its stream against the trailer's CRC and length: nibabel reads only the bytes the header asks for, so a
    corrupt stream could give wrong values without an error."""
    if not str(path).lower().endswith(".gz"):
        return nib.load(path)
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise FileProblem(
            path, f"has a compressed stream that is not whole ({err}): the file is corrupt; copy it again"
        ) from err
    image_class = nib.Nifti2Image if nib.Nifti2Header.may_contain_header(raw) else nib.Nifti1Image
    return image_class.from_bytes(raw)


def _values_problem(data):
    """What is wrong with a file's values as the pipeline reads them (float32 after the header's scaling), or None."""
    with np.errstate(over="ignore", invalid="ignore"):
        values = data.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        where = "" if np.isfinite(data).all() else " (NaN/Inf in the file)"
        return f"{int((~finite).sum())} values that are NaN/Inf as float32{where}, e.g. {data[~finite].flat[0]:.4g}"
    largest = float(np.abs(values).max(initial=0))
    if largest > MAX_ABS_VALUE:
        return (
            f"{int((np.abs(values) > MAX_ABS_VALUE).sum())} values beyond +-{MAX_ABS_VALUE:g} (largest {largest:.4g}),"
            " e.g. a 'no value' marker; set them to 0 (or to a value the map can hold) before use"
        )
    return None


def computed_positions(item, channels, image_key="image") -> list:
    """The positions in ``channels`` of the maps a case's item has computed from its raw series (``maps_source``
    ``COMPUTED_MAPS``; ``[]`` for vendor maps), whose ``image`` entries all name that one series.

    Raises:
        InvalidCaseError: naming the case, for another ``maps_source``, or computed channels given different files.
    """
    source = item.get(MAPS_SOURCE, VENDOR_MAPS)
    if source == VENDOR_MAPS:
        return []
    case, image = item.get("case", "a case"), item[image_key]
    if source != COMPUTED_MAPS:
        raise InvalidCaseError(f"{case}: {MAPS_SOURCE} is {source!r}; it is {VENDOR_MAPS!r} or {COMPUTED_MAPS!r}")
    names = computed_channels(channels)
    positions = [list(channels).index(name) for name in names]
    files = image if isinstance(image, (list, tuple)) else [image]
    if len(files) != len(channels) or len({str(files[i]) for i in positions}) != 1:
        raise InvalidCaseError(
            f"{case}: maps computed from a raw series name that one series as the file of each of {', '.join(names)};"
            f" 'image' gives {[str(f) for f in files]}"
        )
    return positions


def onto_grid(array, affine, shape, target_affine):
    """``array`` resampled (MONAI's ``SpatialResample``: trilinear, 0 outside) onto the grid of ``shape`` and
    ``target_affine``."""
    image = MetaTensor(torch.as_tensor(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine))
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros")(
        image, dst_affine=torch.as_tensor(target_affine), spatial_size=tuple(shape)
    )
    return resampled[0].numpy()


class CheckedNiftiReader(ThreadSafeNibabelReader):
    """MONAI's ``NibabelReader`` (race-free: ``scripts.monai_gaps.ThreadSafeNibabelReader``) with each file read once
    whole (``_read_nifti``) and checked as it is read where ``check``.

    Args:
        check: check every file (``FileProblem`` naming it): a ``.gz`` stream that is not whole, a file that cannot be
            read, a channel file that is not a 3-D grid or not on the first's (the NCCT's) grid by the rule MONAI
            stacks by (``np.allclose`` of the affines), values that are NaN/Inf as float32 or beyond
            ``MAX_ABS_VALUE``.
        kwargs: ``NibabelReader``'s.
    """

    def __init__(self, check=True, **kwargs):
        self.check = check
        super().__init__(**kwargs)

    def verify_suffix(self, filename) -> bool:
        return all(isinstance(name, (str, os.PathLike)) for name in ensure_tuple(filename)) and super().verify_suffix(
            filename
        )

    def read(self, data, **kwargs):
        self.filenames = ensure_tuple(data)
        images = []
        for name in self.filenames:
            try:
                images.append(correct_nifti_header_if_necessary(_read_nifti(name)))
            except FileProblem:
                raise
            except Exception as err:  # nibabel raises several types for missing, truncated and foreign files
                raise FileProblem(name, err, unreadable=True) from err
        return images if len(images) > 1 else images[0]

    def get_data(self, img):
        images = ensure_tuple(img)
        if self.check and len(images) > 1:
            for image, name in zip(images, self.filenames):
                self._check_grid(image, name, images[0])
        return super().get_data(img)

    @staticmethod
    def perfusion_series(path, read=True):
        """The raw CT perfusion series of a NIfTI file, read once whole (``_read_nifti``: a ``.gz`` stream checked)
        (``scripts.data.perfusion_maps.nifti_series``), or with ``read`` False only its header checked
        (``check_series``): ``CtpSeriesError`` (or ``FileProblem``) naming the file."""
        if not read:
            return perfusion_maps.check_series(str(path))
        return perfusion_maps.nifti_series(_read_nifti(path), path)

    def _check_grid(self, image, name, first):
        shape = image.shape
        if len(shape) < 3 or shape[3:] != (1,) * (len(shape) - 3):
            raise FileProblem(name, f"has shape {shape}; a map must be a 3-D grid (x, y, z), a 2-D slice as (x, y, 1)")
        if shape[:3] != first.shape[:3]:
            raise FileProblem(name, f"has shape {shape[:3]}, {NCCT} has {first.shape[:3]}")
        affine, reference = self._get_affine(image), self._get_affine(first)
        if not np.allclose(affine, reference):
            raise FileProblem(name, _affine_problem(affine, reference))

    def _get_array_data(self, img, filename):
        try:
            data = super()._get_array_data(img, filename)
        except Exception as err:  # a file that ends before its data do
            raise FileProblem(filename, err, unreadable=True) from err
        problem = _values_problem(data) if self.check else None
        if problem:
            raise FileProblem(filename, f"has {problem}")
        return data


def _affine_problem(affine, reference):
    return (
        f"has an affine that differs from the {NCCT}'s (by up to {np.abs(affine - reference).max():.2g}; MONAI stacks"
        f" maps only when np.allclose holds)\n{np.array2string(affine, precision=6)}\nvs {NCCT}\n"
        f"{np.array2string(reference, precision=6)}"
    )


class LoadCased(LoadImaged):
    """``LoadImaged`` of one case (its ``image`` and, where listed, ``label``), each key read by the first of
    ``readers`` that takes it, with the checks of the readers and of the case as a whole where ``check``.

    The case checks: a one-file ``image`` holds the channels last, (x, y, z, C); the label is one 3-D grid on the
    image's, 0 and one positive value (after the header's scaling); with ``refuse_blank`` (training) no perfusion map
    has one value everywhere. Each loaded label's meta records its ``lesion_voxels``; the item gets its ``case``
    (the file's name, without ``.nii``/``.nii.gz``, where the item has none).

    Args:
        keys: the image's key, then the label's where there is one.
        channels: the inputs ``image`` lists, in order.
        check: check the files and the case; a problem raises ``InvalidCaseError`` naming the case and the file.
        refuse_blank: refuse a blank perfusion map (training: it teaches the network nothing true).
        reader: a reader (or several) besides ``CheckedNiftiReader``, tried first (configs/dicom.json's).
        compute_maps: compute a ``computed`` case's maps; False loads the case's other files and checks its raw
            series' header only (``scripts.data.datalist``'s check before any work: the series is read once, in the
            run).
        simple_keys: ``LoadImage``'s: the meta keeps no copy of the NIfTI header's geometry (``pixdim``, ``dim``,
            ``srow_*``, ``quatern_*``; the affine holds it), into which MONAI's spatial transforms would write the
            new spacing as a tensor (numpy 2's DeprecationWarning of ``Tensor.__array__`` without ``copy``, from
            monai/transforms/inverse.py). False where the header is copied (``scripts.tools.make_studies``).
    """

    def __init__(
        self, keys, channels=CHANNELS, check=True, refuse_blank=False, reader=None, compute_maps=True, simple_keys=True
    ):
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self._loader = LoadImageWithGivenReader(simple_keys)
        self.readers = [r for r in ensure_tuple(reader) if r is not None] + [CheckedNiftiReader(check=check)]
        self.channels, self.check, self.refuse_blank = list(channels), check, refuse_blank
        self.compute_maps = compute_maps

    def __call__(self, data):
        d = dict(data)
        image_key, *label_keys = self.keys
        files = ensure_tuple(d[image_key])
        d.setdefault("case", file_stem(files[0]))
        d.setdefault(MAPS_SOURCE, VENDOR_MAPS)
        computed = computed_positions(d, self.channels, image_key)
        names = dict(zip(map(str, files), self.channels if len(files) > 1 else ["image"]))
        names.update({str(d[key]): LABEL for key in label_keys if key in d})
        for key in self.key_iterator(d):
            value = [f for i, f in enumerate(files) if i not in computed] if key == image_key and computed else d[key]
            reader = next((r for r in self.readers if r.verify_suffix(value)), None)
            if reader is None:
                raise InvalidCaseError(f"{d['case']}: no reader takes {value} ({', '.join(NIFTI_SUFFIXES)} files)")
            try:
                loaded = self._loader(value, reader)
            except FileProblem as err:
                raise err.for_case(d["case"], names.get(err.path, "a")) from err
            if isinstance(
                loaded, tuple
            ):  # image_only off (MONAI Label sets it): the meta dict too, as LoadImaged keeps it
                loaded, d[f"{key}_{PostFix.meta()}"] = loaded
            if key == image_key and computed:
                loaded = self._with_computed_maps(d["case"], loaded, files[computed[0]], computed)
            d[key] = loaded
        for key in label_keys:
            if key in d:
                d[key].meta["lesion_voxels"] = int(torch.count_nonzero(d[key]))
        if self.check:
            channels = (
                self.channels if self.compute_maps else [c for i, c in enumerate(self.channels) if i not in computed]
            )
            self._check_case(d, files, image_key, [key for key in label_keys if key in d], channels)
        return d

    def _with_computed_maps(self, case, loaded, source, positions):
        """The case's image with the maps computed from its raw series ``source`` in their ``positions``, on the grid
        of its other channels (the NCCT's); without ``compute_maps`` only the series' header is checked."""
        reader = next((r for r in self.readers if r.verify_suffix(source) and hasattr(r, "perfusion_series")), None)
        if reader is None:
            raise InvalidCaseError(f"{case}: no reader reads the raw CT perfusion series {source}")
        what = f"{case}: cannot compute perfusion maps from the raw CT perfusion series"
        try:
            series = reader.perfusion_series(source, read=self.compute_maps)
        except (perfusion_maps.CtpSeriesError, FileProblem) as err:
            raise InvalidCaseError(f"{what} {err}") from err
        except Exception as err:  # nibabel and pydicom raise several types for missing, truncated and foreign files
            raise InvalidCaseError(f"{what} {source}: it cannot be read ({err})") from err
        if not self.compute_maps:
            return loaded
        try:
            maps = perfusion_maps.isles18_maps(perfusion_maps.compute_maps(series))
        except perfusion_maps.CtpSeriesError as err:
            raise InvalidCaseError(f"{what} {err}") from err
        affine, shape = np.asarray(loaded.affine, dtype=np.float64), tuple(loaded.shape[1:])
        on_grid = series.frames.shape[:3] == shape and np.allclose(series.affine, affine, atol=1e-3)
        given, channels = iter(loaded.as_tensor()), []
        for index, name in enumerate(self.channels):
            if index not in positions:
                channels.append(next(given))
                continue
            values = np.asarray(maps[name], dtype=np.float32)
            channels.append(torch.as_tensor(values if on_grid else onto_grid(values, series.affine, shape, affine)))
        image = MetaTensor(torch.stack(channels).to(loaded.dtype))
        image.copy_meta_from(loaded)
        return image

    def _check_case(self, d, files, image_key, label_keys, channels):
        image, case = d[image_key], d["case"]
        if len(files) == 1 and (image.shape[0] != len(channels) or image.ndim != 4):
            raise InvalidCaseError(
                f"{case}: image file {files[0]} holds {image.shape[0]} channel(s) of shape {tuple(image.shape[1:])};"
                f" a single-file input must be (x, y, z, {len(channels)}) with the channels"
                f" {', '.join(channels)} last"
            )
        for index, name in enumerate(channels):
            values = image[index]
            if self.refuse_blank and name in CHANNELS[1:] and values.numel() and values.min() == values.max():
                path = files[min(self.channels.index(name), len(files) - 1)]
                raise InvalidCaseError(
                    f"{case}: {name} file {path} has the same value ({float(values.min()):.4g})"
                    " in every voxel: a blank map (the perfusion software produced none) teaches the network nothing"
                    " true; leave the case out"
                )
        for key in label_keys:
            self._check_label(case, d[key], image)

    @staticmethod
    def _check_label(case, label, image):
        path = label.meta["filename_or_obj"]
        shape = tuple(int(s) for s in label.meta["spatial_shape"])
        if label.shape[0] != 1 or len(shape) != 3:
            channels = f" x {label.shape[0]} channels" if label.shape[0] > 1 else ""
            raise InvalidCaseError(
                f"{case}: {LABEL} file {path} has shape {shape}{channels}; a map must be a 3-D grid (x, y, z), a 2-D"
                " slice as (x, y, 1)"
            )
        reference = tuple(int(s) for s in image.meta["spatial_shape"])
        if shape != reference:
            raise InvalidCaseError(f"{case}: {LABEL} file {path} has shape {shape}, {NCCT} has {reference}")
        affine, reference_affine = (np.asarray(x.meta["original_affine"], dtype=np.float64) for x in (label, image))
        if not np.allclose(affine, reference_affine):
            raise InvalidCaseError(f"{case}: {LABEL} file {path} {_affine_problem(affine, reference_affine)}")
        values = label.numpy()
        top = values.max(initial=0)
        if values.min(initial=0) < 0 or np.any((values != 0) & (values != top)):
            raise InvalidCaseError(
                f"{case}: label file {path} is not a binary mask: values {np.unique(values)[:10].tolist()} (after the"
                " header's scaling); a mask is 0 and one positive value, read as lesion where > 0"
            )
