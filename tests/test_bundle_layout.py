"""The bundle's layout and metadata promises: what MONAI `run`, MONAI Label and the README rely on."""

import glob
import json
import os
import re

import monai
from monai.bundle import ConfigParser
from scripts.data.channels import CHANNELS


def load(repo_root, *parts):
    with open(os.path.join(repo_root, *parts)) as f:
        return json.load(f)


def test_model_zoo_layout(repo_root):
    for name in ("configs", "models", "scripts", "docs", "tests"):
        assert os.path.isdir(os.path.join(repo_root, name)), name
    for name in (
        "LICENSE",
        "README.md",
        "docs/README.md",
        "docs/data_license.txt",
        "models/README.md",
        "configs/train.json",
        "configs/logging.conf",
        "requirements.txt",
        "requirements-dev.txt",
    ):
        assert os.path.isfile(os.path.join(repo_root, name)), name
    assert "Apache License" in open(os.path.join(repo_root, "LICENSE")).read()


def test_root_metadata_is_a_link_to_the_configs_one(repo_root):
    root = os.path.join(repo_root, "metadata.json")
    assert os.path.islink(root) and os.path.realpath(root) == os.path.realpath(
        os.path.join(repo_root, "configs", "metadata.json")
    )
    assert load(repo_root, "metadata.json") == load(repo_root, "configs", "metadata.json")


def test_metadata_matches_the_configs(repo_root):
    meta = load(repo_root, "configs", "metadata.json")
    train = load(repo_root, "configs", "train.json")
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == monai.__version__
    image = meta["network_data_format"]["inputs"]["image"]
    assert [image["channel_def"][str(i)] for i in range(image["num_channels"])] == list(CHANNELS) == train["channels"]
    assert image["spatial_shape"] == train["spatial_size"] == [128, 128, 32]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "lesion"}
    assert pred["num_channels"] == train["network_def"]["out_channels"]
    assert train["network_def"]["in_channels"] == "$len(@channels)" and image["num_channels"] == len(train["channels"])
    assert any("Omarov" in ref for ref in meta["references"]) and any("ISLES" in ref for ref in meta["references"])


def test_ci_runs_the_readme_test_command(repo_root):
    readme = open(os.path.join(repo_root, "README.md")).read()
    ci = open(os.path.join(repo_root, ".ci", "run")).read()
    (test_cmd,) = re.findall(r"pip install -r requirements-dev\.txt && (python -m pytest[^\n`]*)", readme)
    assert test_cmd in ci
    assert "pip install --quiet torch==2.13.0" in ci and "requirements-dev.txt" in ci


# The ids inference.json defines otherwise than train.json, by design. Every other id both define is a copy: MONAI
# Label reads each of the two alone, from its own working folder, so neither can take them from the other (a
# `%configs/...` macro is resolved against the working folder). train.json is the source; the test below checks
# inference.json's copies against it, whatever ids the two come to share.
DEFINED_OTHERWISE_FOR_INFERENCE = {
    "imports",
    "amp",
    "load_keys",
    "spatial_keys",
    "resize_modes",
    "datalist",
    "refuse_blank_maps",  # training refuses a case with a blank map; inference segments it and says so
    "preprocessing_transforms",
    "postprocessing",
    "initialize",
    "run",
    "finalize",
}


def test_inference_json_stands_alone_and_copies_train_jsons_network_and_preprocessing(repo_root):
    train, infer = load(repo_root, "configs", "train.json"), load(repo_root, "configs", "inference.json")
    shared = train.keys() & infer.keys()
    assert {"network_def", "features", "channels", "spatial_size", "ct_window", "lesion_threshold"} <= shared
    copies = shared - DEFINED_OTHERWISE_FOR_INFERENCE
    assert [key for key in sorted(copies) if infer[key] != train[key]] == [], "inference.json's copies of train.json"
    # one pre-processing, built from each config's own ids; inference keeps the maps the per-case report reads, and
    # its reader is the place configs/dicom.json sets the DICOM one
    expected = {**train["preprocessing_transforms"], "input_map_keys": "@input_map_keys", "reader": None}
    assert expected == infer["preprocessing_transforms"]
    for config in (train, infer):
        assert "%" not in json.dumps(config), "MONAI Label reads train.json and inference.json without the others"
    assert infer["load_keys"] == infer["spatial_keys"] == ["@image_key"], "MONAI Label's requests have no label"
    assert "@datalist" not in json.dumps(
        [infer["preprocessing_transforms"], infer["postprocessing"]]
    ), "MONAI Label builds pre- and postprocessing without the run's datalist"


def targets(config):
    """Every ``_target_`` a config defines, anywhere in it."""
    if isinstance(config, dict):
        return {config.get("_target_")} - {None} | {t for v in config.values() for t in targets(v)}
    return {t for v in config for t in targets(v)} if isinstance(config, list) else set()


def test_evaluation_adds_only_what_needs_labels_to_the_prediction_pipeline(repo_root):
    """evaluate.json is an override of inference.json: it defines none of its components again (no transform,
    handler or evaluator of inference.json's), only the labelled datalist, the reference key and the baselines to
    score."""
    evaluate, infer = load(repo_root, "configs", "evaluate.json"), load(repo_root, "configs", "inference.json")
    assert not targets(evaluate) & targets(infer), targets(evaluate) & targets(infer)
    pipeline = {"preprocessing", "preprocessing_transforms", "postprocessing", "inferer", "evaluator", "networks"}
    assert not {key.split("#")[0] for key in evaluate} & pipeline
    assert len(open(os.path.join(repo_root, "configs", "evaluate.json")).read().splitlines()) < 120
    for name in os.listdir(os.path.join(repo_root, "configs")):
        assert '"%' not in open(os.path.join(repo_root, "configs", name)).read(), f"{name}: no macros"


def test_multi_gpu_evaluation_copies_the_training_overrides(repo_root):
    """The distributed set-up both multi-GPU files need (backend, device, ranks, amp dtype, process group): each is
    an override of another config (train.json; inference.json + evaluate.json), so neither can take it from the
    other. multi_gpu_train.json is the source; every key both define is checked against it."""
    train, evaluate = (load(repo_root, "configs", f"multi_gpu_{name}.json") for name in ("train", "evaluate"))
    shared = train.keys() & evaluate.keys()
    assert {"backend", "device", "is_rank0", "amp_kwargs", "dist_initialize", "dist_finalize"} <= shared
    assert [key for key in sorted(shared) if evaluate[key] != train[key]] == []
    assert evaluate["dataloader#sampler"] == dict(train["validation_sampler"], dataset="@dataset")


def test_inference_handlers_are_a_plain_list(repo_root):
    """So that the zoo's usual `--handlers#0#_disabled_ true` override works."""
    parser = ConfigParser()
    parser.read_config(os.path.join(repo_root, "configs", "inference.json"))
    names = [type(h).__name__ for h in parser.get_parsed_content("handlers")]
    parser["handlers#0#_disabled_"] = True
    parser.parse()
    assert [type(h).__name__ for h in parser.get_parsed_content("handlers")] == names[1:] and len(names) == 2


# The documentation pages kept true by the tests below, and the files they may name that a run writes (not in git).
DOC_PAGES = (
    "README.md",
    "docs/README.md",
    "docs/architecture.md",
    "docs/dicom.md",
    "docs/evaluation.md",
    "docs/monai_label.md",
    "docs/multi_gpu_and_export.md",
    "models/README.md",
    "benchmarks/README.md",
)
WRITTEN_BY_A_RUN = {"configs/datalist.json", "benchmarks/gpu_results.json"}
SCRIPTS_NAME = re.compile(r"(?<![\w.])scripts\.((?:tools|data|dicom|engine|report|synthetic)\.\w+|\w+)(?:\.(\w+))?")
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|configs|tests|docs|tools|benchmarks)/[\w.=/-]*[\w/])")


def scripts_modules(repo_root):
    """The modules and packages of scripts/ as dotted names under ``scripts`` (``data``, ``data.isles18``,
    ``tools.pacs``, ...)."""
    modules = set()
    for path in glob.glob(os.path.join(repo_root, "scripts", "**", "*.py"), recursive=True):
        name = os.path.relpath(path, os.path.join(repo_root, "scripts"))[:-3].replace(os.sep, ".")
        modules.add(name[: -len(".__init__")] if name.endswith(".__init__") else name)
    return modules - {"__init__"}


def missing_names(repo_root, text):
    """The ``scripts.<module>[.<attribute>]`` and repository paths named in ``text`` that do not exist."""
    import importlib

    missing = []
    for module, attribute in SCRIPTS_NAME.findall(text):
        if module not in scripts_modules(repo_root):
            missing.append(f"scripts.{module}")
        elif attribute and not hasattr(importlib.import_module(f"scripts.{module}"), attribute):
            missing.append(f"scripts.{module}.{attribute}")
    for path in REPO_PATH.findall(text):
        if path not in WRITTEN_BY_A_RUN and not os.path.exists(os.path.join(repo_root, path)):
            missing.append(path)
    return sorted(set(missing))


def test_architecture_doc_names_every_scripts_module_and_config(repo_root):
    text = open(os.path.join(repo_root, "docs", "architecture.md")).read()
    named = set(SCRIPTS_NAME.findall(text))
    packages = {
        m for m in scripts_modules(repo_root) if os.path.isdir(os.path.join(repo_root, "scripts", *m.split(".")))
    }
    assert scripts_modules(repo_root) - packages <= {m for m, _ in named}, "scripts/ modules not in architecture.md"
    configs = {f"configs/{f}" for f in os.listdir(os.path.join(repo_root, "configs")) if f.endswith(".json")}
    assert configs - WRITTEN_BY_A_RUN <= set(REPO_PATH.findall(text)), "configs not in architecture.md"
    assert missing_names(repo_root, text) == []


def test_docs_name_only_modules_files_and_links_that_exist(repo_root):
    for page in DOC_PAGES:
        text = open(os.path.join(repo_root, page)).read()
        assert missing_names(repo_root, text) == [], page
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(repo_root, os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), (page, target)


def requirements(path):
    """The requirement lines of a pip requirements file, as ``packaging`` requirements (comments and ``-r`` lines
    left out)."""
    from packaging.requirements import Requirement

    with open(path) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def test_requirements_dev_pins_every_version_the_metadata_records(repo_root):
    """requirements-dev.txt (what the tests install) pins each version metadata.json records, so no upstream release
    changes what the tests run with; requirements.txt (for users, open ranges) admits each of them."""
    from packaging.utils import canonicalize_name

    meta = load(repo_root, "configs", "metadata.json")
    recorded = {
        "monai": meta["monai_version"],
        "torch": meta["pytorch_version"],
        "numpy": meta["numpy_version"],
        **meta["required_packages_version"],
    }
    recorded = {canonicalize_name(name): version for name, version in recorded.items()}
    pins = {}
    for requirement in requirements(os.path.join(repo_root, "requirements-dev.txt")):
        (specifier,) = requirement.specifier or [None]
        if specifier is not None and specifier.operator == "==":
            pins[canonicalize_name(requirement.name)] = specifier.version
    assert {name: pins.get(name) for name in recorded} == recorded
    for requirement in requirements(os.path.join(repo_root, "requirements.txt")):
        name = canonicalize_name(requirement.name)
        assert name in recorded, f"{name}: in requirements.txt but its version is not recorded in metadata.json"
        assert requirement.specifier.contains(recorded[name]), (name, str(requirement.specifier), recorded[name])


def test_the_runtime_the_configs_call_imports_no_command_line_tool_and_no_import_is_circular():
    """What the configs call, and all it imports (what the MONAI Label app gets), holds no command-line tool; no
    module of scripts/ reaches itself through its imports, and none imports a later stage."""
    from scripts.tools.monailabel_app import import_graph, runtime_modules

    runtime = runtime_modules()
    assert "tools" not in runtime, "the runtime imports a command-line tool (scripts.tools)"
    assert {"engine.networks", "report.cases", "data.transforms", "report.metrics", "engine.checkpoints"} <= runtime
    graph = import_graph()
    reached = {module: set(graph[module]) for module in graph}
    for _ in graph:  # the transitive closure
        reached = {m: r | {n for k in r for n in reached[k]} for m, r in reached.items()}
    assert not [m for m in graph if m in reached[m]], "an import cycle"
    # the folders are stages (docs/architecture.md): each imports only the shared top-level modules and earlier stages
    stages = ["data", "engine", "report", "dicom", "synthetic", "tools"]

    def stage(module):
        folder = module.split(".")[0]
        return stages.index(folder) + 1 if "." in module or folder == "tools" else 0

    assert {m.split(".")[0] for m in graph if "." in m} <= set(stages), "a folder of scripts/ that is no stage"
    upward = sorted(f"{m} -> {n}" for m in graph for n in graph[m] if stage(n) > stage(m))
    assert not upward, f"imports of a later stage: {upward}"


def test_the_paper_profile_builds_the_papers_training(repo_root):
    """configs/paper.json after train.json (it sets the loss, train.json's defaults are the paper's other settings):
    the IoU loss, Adam at 2e-4 with L2 1e-3, 650 epochs and dropout 0.5 in the built objects; train.json alone trains
    with Dice + cross-entropy."""
    import torch
    from monai.losses import DiceCELoss, DiceLoss

    def parsed(*names):
        parser = ConfigParser()
        parser.read_config([os.path.join(repo_root, "configs", name) for name in names])
        parser.update({"features": [4, 8, 16, 32, 64], "device": "cpu"})
        return parser

    paper = parsed("train.json", "paper.json")
    loss = paper.get_parsed_content("loss")
    assert type(loss) is DiceLoss and loss.jaccard and loss.batch and not loss.include_background
    optimizer = paper.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 2e-4 and optimizer.defaults["weight_decay"] == 1e-3
    assert paper.get_parsed_content("epochs") == 650
    dropouts = [m.p for m in paper.get_parsed_content("network_def").modules() if isinstance(m, torch.nn.Dropout3d)]
    assert dropouts and set(dropouts) == {0.5}
    assert isinstance(parsed("train.json").get_parsed_content("loss"), DiceCELoss)
