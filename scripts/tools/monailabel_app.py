"""Put this bundle, with a trained model, into a MONAI Label ``monaibundle`` app folder, ready for ``start_server``.

MONAI Label's stock ``monaibundle`` sample app serves the bundles found in ``<app>/model/<name>/`` (with
``--conf models <name>``). It reads ``configs/inference.json`` and ``configs/train.json`` ONLY, without the override
files used on the command line, and loads ``models/model.pt`` non-strictly: a model trained with other ``features``
than the configs say is served anyway, with whatever weights happen to fit. So this copies the bundle, writes the
settings the model was trained with into the copy's configs, and checks that the weights load strictly.

    # the released/full-size model (configs' defaults)
    python -m scripts.tools.monailabel_app --app_dir ~/isles-app --model models/model.pt
    # the demo model: pass the network settings of configs/demo.json (`features`, `spatial_size`)
    python -m scripts.tools.monailabel_app --app_dir ~/isles-app --model demo_data/models/model.pt \\
        --features "<demo.json's features>" --spatial_size "<demo.json's spatial_size>"

The sample app is taken from the MONAI Label installation of the running Python, else from ``.venv-monailabel``
(``scripts/tools/monailabel-env``), else from ``--sample_app``. An existing ``<app>/model/<name>`` is replaced only with
``--overwrite``; an existing app folder keeps its own files (several bundles can share one app).
"""

import ast
import glob
import importlib.util
import json
import os
import re
import shutil
import sys

from scripts import BUNDLE_ROOT
from scripts.tools.cli import run

SAMPLE_APP = os.path.join("monailabel", "sample-apps", "monaibundle")  # under the environment's sys.prefix
CONFIGS = ("inference.json", "train.json")  # what MONAI Label reads
# MONAI Label retrains in place: POST /train runs train.json into the bundle folder whose models/model.pt it serves,
# which a plain training run refuses to replace (train.json's `overwrite`).
APP_SETTINGS = {"train.json": {"overwrite": True}}
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a folder of its own under <app>/model/


def find_sample_app(sample_app=None):
    """The ``monaibundle`` sample app folder shipped in the monailabel wheel."""
    candidates = [sample_app] if sample_app else []
    if importlib.util.find_spec("monailabel") is not None:
        candidates.append(os.path.join(sys.prefix, SAMPLE_APP))
    candidates.append(os.path.join(BUNDLE_ROOT, ".venv-monailabel", SAMPLE_APP))
    for path in candidates:
        if os.path.isfile(os.path.join(path, "main.py")):
            return path
    raise FileNotFoundError(
        f"no MONAI Label monaibundle sample app in {', '.join(candidates)}; build the MONAI Label"
        " environment (bash scripts/tools/monailabel-env) or pass --sample_app"
    )


def scripts_modules() -> set:
    """The modules of scripts/ as dotted names under ``scripts`` (``data.isles18``, ``engine.networks``, ...), the
    command-line tools (scripts/tools/) as one module ``tools``."""
    folder = os.path.join(BUNDLE_ROOT, "scripts")
    modules = {"tools"}
    for path in glob.glob(os.path.join(folder, "**", "*.py"), recursive=True):
        name = os.path.relpath(path, folder)[:-3].replace(os.sep, ".")
        if not name.startswith("tools") and not name.endswith("__init__"):
            modules.add(name)
    return modules


def _module_of(name: str, modules: set) -> str | None:
    """The module of ``modules`` that the import of ``scripts.<name>`` reaches (``tools`` for any tool)."""
    if name.split(".")[0] == "tools":
        return "tools"
    return name if name in modules else None


def import_graph() -> dict:
    """``{module: the modules of scripts/ it imports}`` (``scripts_modules`` names), read from the sources, leaving
    out each module's ``if __name__ == "__main__":`` block (its command-line edge, not imported with it)."""
    folder = os.path.join(BUNDLE_ROOT, "scripts")
    modules = scripts_modules()
    graph = {"tools": set()}  # the command-line tools, as one node: the runtime must not reach it
    for module in modules - {"tools"}:
        with open(os.path.join(folder, *module.split(".")) + ".py") as f:
            tree = ast.parse(f.read())
        body = [node for node in tree.body if not (isinstance(node, ast.If) and "__main__" in ast.dump(node.test))]
        names = set()
        for node in (n for top in body for n in ast.walk(top)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scripts."):
                base = node.module.split(".", 1)[1]
                names |= {_module_of(base, modules)} | {_module_of(f"{base}.{a.name}", modules) for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {
                    _module_of(a.name.split(".", 1)[1], modules) for a in node.names if a.name.startswith("scripts.")
                }
        graph[module] = names - {None}
    return graph


def runtime_modules() -> set:
    """The modules of scripts/ that the configs call, with every module they import (``import_graph``): what a
    bundle needs to run, without the command-line tools."""
    graph = import_graph()
    named = set()
    for path in glob.glob(os.path.join(BUNDLE_ROOT, "configs", "*.json")):
        if os.path.basename(path) != "metadata.json":
            with open(path) as f:
                for name in re.findall(r"(?<![\w.])scripts\.([\w.]+)", f.read()):
                    parts = name.split(".")
                    named |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(graph)
    runtime = set()
    while named:
        module = named.pop()
        runtime.add(module)
        named |= graph[module] - runtime
    return runtime


def _copy_bundle(target):
    os.makedirs(os.path.join(target, "configs"))
    for path in glob.glob(os.path.join(BUNDLE_ROOT, "configs", "*")):
        name = os.path.basename(path)
        if os.path.isfile(path) and name.endswith((".json", ".yaml", ".conf")) and not name.startswith("datalist"):
            shutil.copy(path, os.path.join(target, "configs"))
    for module in sorted(runtime_modules()):  # the runtime only: no command-line tool
        parts = module.split(".")
        for depth in range(len(parts)):  # the module and the __init__.py of each package above it
            package = os.path.join("scripts", *parts[:depth])
            os.makedirs(os.path.join(target, package), exist_ok=True)
            shutil.copy(os.path.join(BUNDLE_ROOT, package, "__init__.py"), os.path.join(target, package))
        source = os.path.join("scripts", *parts) + ".py"
        shutil.copy(os.path.join(BUNDLE_ROOT, source), os.path.join(target, source))
    shutil.copytree(os.path.join(BUNDLE_ROOT, "docs"), os.path.join(target, "docs"))
    shutil.copy(os.path.join(BUNDLE_ROOT, "LICENSE"), target)
    os.makedirs(os.path.join(target, "models"))


def _config(folder, name):
    with open(os.path.join(folder, "configs", name)) as f:
        return json.load(f)


def _check_settings(settings):
    """Every id to set must be a top-level id of inference.json or train.json (a typo would otherwise do nothing)."""
    known = set().union(*(_config(BUNDLE_ROOT, name) for name in CONFIGS))
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}: not a top-level id of {' or '.join(CONFIGS)}")


def _write_settings(target, settings):
    """Set top-level ids in the copy's inference.json and train.json, where each has them, and ``APP_SETTINGS``."""
    for name in CONFIGS:
        config = _config(target, name)
        config.update({key: value for key, value in settings.items() if key in config})
        config.update(APP_SETTINGS.get(name, {}))
        with open(os.path.join(target, "configs", name), "w") as f:
            json.dump(config, f, indent=4)


def check_model(model_path, settings=None):
    """Load ``model_path`` STRICTLY (MONAI's ``CheckpointLoader``) into the network of inference.json with
    ``settings`` applied, as MONAI Label will not; raises ``ValueError`` naming the file and the settings to pass."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser
    from scripts.engine.checkpoints import NamedCheckpointLoader
    from scripts.engine.networks import check_spatial_size

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "inference.json"))
    parser.update({"bundle_root": BUNDLE_ROOT, **(settings or {})})
    check_spatial_size(parser.get_parsed_content("spatial_size"), len(parser.get_parsed_content("features")))
    network = parser.get_parsed_content("network_def")
    NamedCheckpointLoader(load_path=model_path, load_dict={"model": network}, map_location="cpu")(
        Engine(lambda engine, batch: None)
    )


def _check_replaceable(target, models_dir):
    """Refuse to let ``--overwrite`` remove ``target`` unless it is a folder of its own in ``models_dir``: not a link
    (to a folder elsewhere, or to a sibling bundle), whose real path is strictly inside ``models_dir``.

    Args:
        target: The existing ``<app>/model/<name>``.
        models_dir: ``<app>/model``.

    Raises:
        ValueError: If ``target`` is a link or resolves to anything but itself under ``models_dir``.
    """
    real_target = os.path.realpath(target)
    if os.path.islink(target) or real_target != os.path.join(os.path.realpath(models_dir), os.path.basename(target)):
        raise ValueError(
            f"{target} resolves to {real_target}, not to a folder of its own in {models_dir}; --overwrite"
            f" replaces only such a folder: remove {target} yourself or pick another --name"
        )


def install(
    app_dir,
    model="models/model.pt",
    name="isles_ctp",
    features=None,
    spatial_size=None,
    settings=None,
    sample_app=None,
    overwrite=False,
):
    """Create (or reuse) ``app_dir`` as a copy of the monaibundle sample app and put the bundle in
    ``app_dir/model/<name>`` with ``model`` as ``models/model.pt``; returns the bundle folder.

    ``features`` / ``spatial_size`` (and any other top-level ids in ``settings``, e.g. ``{"num_workers": 0}``) are
    written into the copy's inference.json and train.json. ``name`` must be a plain folder name; with ``overwrite`` an
    existing ``app_dir/model/<name>`` folder is replaced, never a link or anything outside ``app_dir/model``."""
    if not BUNDLE_NAME.fullmatch(name):
        raise ValueError(
            f"--name must be a plain folder name (letters, digits, '.', '_' and '-', starting with a"
            f" letter or digit), got {name!r}"
        )
    if not os.path.isfile(model):
        raise FileNotFoundError(
            f"no trained model at {model}: train one (README, 'Training'; the demo writes"
            " demo_data/models/model.pt) or pass --model"
        )
    app_dir = os.path.abspath(app_dir)
    models_dir = os.path.join(app_dir, "model")
    target = os.path.join(models_dir, name)
    others = sorted(os.listdir(app_dir)) if os.path.isdir(app_dir) else []
    if others and not os.path.isfile(os.path.join(app_dir, "main.py")):
        raise FileExistsError(
            f"{app_dir} holds files ({', '.join(others[:5])}) but no MONAI Label app (no main.py): the sample app"
            " would be copied over them; choose a new or empty --app_dir, or an existing app"
        )
    if os.path.lexists(target):
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
        _check_replaceable(target, models_dir)
    settings = dict(settings or {})
    if features is not None:
        settings["features"] = [int(f) for f in features]
    if spatial_size is not None:
        settings["spatial_size"] = [int(s) for s in spatial_size]
    _check_settings(settings)
    check_model(model, settings)
    if not os.path.isfile(os.path.join(app_dir, "main.py")):
        shutil.copytree(
            find_sample_app(sample_app),
            app_dir,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    staging = os.path.join(models_dir, f".{name}.partial")  # never a half-written bundle under model/<name>
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _copy_bundle(staging)
        _write_settings(staging, settings)
        shutil.copy(model, os.path.join(staging, "models", "model.pt"))
        if os.path.lexists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(
    app_dir: str,
    model: str = "models/model.pt",
    name: str = "isles_ctp",
    features: list | tuple | None = None,
    spatial_size: list | tuple | None = None,
    settings: dict | None = None,
    sample_app: str | None = None,
    overwrite: bool = False,
):
    """CLI: see the module docstring."""
    target = install(app_dir, model, name, features, spatial_size, settings, sample_app, overwrite)
    print(
        f"{target}: bundle with {model} as models/model.pt\nstart the server with:\n"
        f"  .venv-monailabel/bin/python -m monailabel.main start_server --app {os.path.dirname(os.path.dirname(target))}"
        f" --studies STUDIES_DIR --conf models {name} --conf zoo_source github --conf sam2 false"
        f" --host 127.0.0.1 --port 8000"
    )


if __name__ == "__main__":
    run(main)
