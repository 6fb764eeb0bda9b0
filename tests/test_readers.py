"""scripts/data/readers.py: the configs' NIfTI reader under CacheDataset's thread pool."""

import copy
import glob
import json
import os
import pickle
import threading

import nibabel as nib
import pytest
from monai.bundle import ConfigParser
from monai.data import CacheDataset
from scripts.data.datalist import build_datalist, load_fold
from scripts.data.readers import CheckedNiftiReader
from scripts.monai_gaps import ThreadSafeNibabelReader
from scripts.synthetic.isles import generate

READERS = pytest.mark.parametrize("reader_class", [ThreadSafeNibabelReader, CheckedNiftiReader])


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    """10 training slabs of 2 to 22 slices, every other map file gzipped: .nii and .nii.gz side by side."""
    root = str(tmp_path_factory.mktemp("mixed"))
    generate(root, num_train=10, num_test=0, seed=5, in_plane=32, slices=(2, 4, 8, 16, 22))
    for index, path in enumerate(sorted(glob.glob(os.path.join(root, "TRAINING", "*", "*", "*.nii")))):
        if index % 2:
            nib.save(nib.load(path), path + ".gz")
            os.remove(path)
    datalist = os.path.join(root, "datalist.json")
    with open(datalist, "w") as f:
        json.dump(build_datalist(root, folds=2, seed=0), f)
    return root, datalist


@READERS
def test_names_of_a_read_stay_with_the_thread_that_read(mixed_tree, reader_class):
    """The interleaving that broke MONAI's reader: thread A reads 5 maps, thread B a label, then A gets its data."""
    root, datalist = mixed_tree
    item = load_fold(datalist, root, 0)["train"][0]
    reader = reader_class()
    images = reader.read(item["image"])
    other = threading.Thread(target=reader.read, args=(item["label"],))
    other.start()
    other.join()
    data, meta = reader.get_data(images)
    assert data.shape[0] == 5 and tuple(meta["spatial_shape"]) == nib.load(item["image"][0]).shape


def test_cache_built_by_four_threads_has_every_channel_and_the_right_case(repo_root, mixed_tree):
    """train.json's validation preprocessing (image and label through one LoadImaged), cached by 4 threads, 10 times:
    MONAI's own reader failed 5 of 6 such builds here with `count of splits must match output_postfixes, 5 != 1`."""
    root, datalist = mixed_tree
    parser = ConfigParser()
    parser.read_config(os.path.join(repo_root, "configs", "train.json"))
    parser.update({"spatial_size": [32, 32, 16], "dataset_dir": root, "data_list_file_path": datalist})
    fold = load_fold(datalist, root, 0)
    items = fold["train"] + fold["validation"]
    transform = parser.get_parsed_content("validate#preprocessing")
    for _ in range(10):
        cache = CacheDataset(items, transform, num_workers=4, progress=False)
        for item, cached in zip(items, cache):
            assert cached["image"].shape[0] == 5
            assert cached["image"].meta["filename_or_obj"] == item["image"][0]
            assert cached["label"].meta["filename_or_obj"] == item["label"]


@READERS
def test_reader_survives_deepcopy_and_pickle(reader_class):
    """Spawned DataLoader workers pickle the transforms, MONAI deep-copies them; a thread-local cannot be either."""
    reader = reader_class(as_closest_canonical=True)
    reader.filenames = ("a.nii",)
    for clone in (copy.deepcopy(reader), pickle.loads(pickle.dumps(reader))):
        assert clone.as_closest_canonical
        clone.filenames = ("b.nii",)
        assert clone.filenames == ("b.nii",) and reader.filenames == ("a.nii",)
