"""scripts/tools/cli.py: the bundle's CLIs refuse unknown flags, surplus arguments and values of the wrong type before their
``main`` runs, so nothing is written, with one line on stderr; a correct command still works."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

DATALIST_FLAGS = (
    "--data_root, --output, --folds, --seed, --patients_csv, --check, --skip_invalid, --overwrite, --channels"
)
STUDIES_FLAGS = "--source, --output_dir, --sections, --labels, --overwrite, --check, --skip_invalid, --channels"
APP_FLAGS = "--app_dir, --model, --name, --features, --spatial_size, --settings, --sample_app, --overwrite"


def run_cli(repo_root, module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"scripts.tools.{module}", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def required_args(module, source, output):
    """The arguments each CLI needs: its input and where it writes."""
    return {
        "prepare_datalist": ["--data_root", source, "--output", output],
        "make_studies": ["--source", source, "--output_dir", output],
        "monailabel_app": ["--app_dir", output, "--model", os.path.join(source, "model.pt")],
    }[module]


REFUSED = [  # (CLI, arguments after the required ones, exit status, the one line on stderr)
    (
        "prepare_datalist",
        ["--chek", "True"],
        2,
        f"error: unknown flag --chek for scripts.tools.prepare_datalist (did you mean --check?); known flags: {DATALIST_FLAGS}",
    ),
    (
        "prepare_datalist",
        ["-s", "1"],
        2,  # fire's one-letter shortcut, but --seed and --skip_invalid both start with s
        f"error: unknown flag -s for scripts.tools.prepare_datalist; known flags: {DATALIST_FLAGS}",
    ),
    (
        "prepare_datalist",
        ["3", "0", "None", "True", "False", "False", "False", "surplus"],
        2,
        (
            "error: unexpected argument 'surplus' for scripts.tools.prepare_datalist: every parameter has a value"
            f" ({DATALIST_FLAGS})"
        ),
    ),
    ("prepare_datalist", ["--folds", "2.5"], 1, "error: --folds must be an integer, got 2.5"),
    ("prepare_datalist", ["--folds", "abc"], 1, "error: --folds must be an integer, got 'abc'"),
    ("prepare_datalist", ["--folds=True"], 1, "error: --folds must be an integer, got True"),
    ("prepare_datalist", ["--seed", "abc"], 1, "error: --seed must be an integer, got 'abc'"),
    ("prepare_datalist", ["--check", "maybe"], 1, "error: --check must be true or false, got 'maybe'"),
    (
        "make_studies",
        ["--lables"],
        2,
        f"error: unknown flag --lables for scripts.tools.make_studies (did you mean --labels?); known flags: {STUDIES_FLAGS}",
    ),
    ("make_studies", ["--sections", "1"], 1, "error: sections must be TRAINING and/or TESTING, got ['1']"),
    (
        "make_studies",
        ["--channels", "CT,CBF"],
        1,
        "error: channels ['CT', 'CBF']: the model's inputs are CT, CBF, CBV, MTT, Tmax, in that order, then optionally CTA",
    ),
    (
        "monailabel_app",
        ["--overwite"],
        2,
        (
            "error: unknown flag --overwite for scripts.tools.monailabel_app (did you mean --overwrite?);"
            f" known flags: {APP_FLAGS}"
        ),
    ),
    ("monailabel_app", ["--features", "8"], 1, "error: --features must be a list, a tuple or None, got 8"),
]


@pytest.mark.parametrize(
    "module, args, status, line", REFUSED, ids=[f"{module}-{' '.join(args)}" for module, args, _, _ in REFUSED]
)
def test_a_bad_command_line_is_refused_before_anything_is_written(
    repo_root, synthetic_tree, tmp_path, module, args, status, line
):
    output = str(tmp_path / "output")
    result = run_cli(repo_root, module, *required_args(module, synthetic_tree, output), *args)
    assert result.returncode == status, result.stderr
    assert result.stderr.strip().splitlines() == [line]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(output), "nothing is written for a refused command line"


@pytest.mark.parametrize(
    "args, folds, seed",
    [
        (["--data-root={tree}", "--output", "{out}", "--folds=3", "--seed", "1", "--nocheck"], 3, 1),
        (["{tree}", "{out}", "-f", "2", "--check"], 2, 0),  # positional arguments and fire's one-letter shortcut
    ],
    ids=["flags", "positional"],
)
def test_a_correct_command_still_works(repo_root, synthetic_tree, tmp_path, args, folds, seed):
    out = tmp_path / "datalist.json"
    result = run_cli(repo_root, "prepare_datalist", *(a.format(tree=synthetic_tree, out=out) for a in args))
    assert result.returncode == 0, result.stderr
    datalist = json.loads(out.read_text())
    assert datalist["num_folds"] == folds and datalist["seed"] == seed and len(datalist["training"]) == 10


@pytest.mark.parametrize("where", ["alone", "after_arguments"])
def test_help_shows_the_flags_and_runs_nothing(repo_root, synthetic_tree, tmp_path, where):
    out = tmp_path / "datalist.json"
    args = ["--help"] if where == "alone" else ["--data_root", synthetic_tree, "--output", str(out), "--help"]
    result = run_cli(repo_root, "prepare_datalist", *args)
    assert result.returncode == 0, result.stderr
    assert "--patients_csv" in result.stdout + result.stderr
    assert not out.exists()


@pytest.mark.parametrize("typed, checked", [("false", False), ("False", False), ("true", True), ("TRUE", True)])
def test_a_flag_typed_true_or_false_means_what_it_says(repo_root, synthetic_tree, tmp_path, typed, checked):
    """fire passes `--check false` on as the text 'false', which Python takes for true."""
    tree = tmp_path / "isles"
    shutil.copytree(synthetic_tree, tree)
    (ct,) = glob.glob(str(tree / "TRAINING" / "case_2" / "*.CT.*" / "*.nii"))
    with open(ct, "w") as f:
        f.write("not a NIfTI file")
    out = tmp_path / "datalist.json"
    result = run_cli(repo_root, "prepare_datalist", "--data_root", str(tree), "--output", str(out), "--check", typed)
    assert (result.returncode != 0 and f"error: case_2: cannot read CT file {ct}" in result.stderr) == checked
    assert out.exists() != checked


@pytest.mark.parametrize(
    "args, typo, nearest",
    [
        (["training", "--config_file", "configs/train.json", "--epoch", "1"], "epoch", "epochs"),
        (
            ["--config_file", "['configs/inference.json','configs/demo.json']", "--tta_flip", "true"],
            "tta_flip",
            "tta_flips",
        ),
        (
            [
                "evaluating",
                "--config_file",
                "['configs/inference.json','configs/evaluate.json']",
                "--fold=1",
                "--evalsection",
                "x",
            ],
            "evalsection",
            "eval_section",
        ),
    ],
    ids=["training", "inference", "evaluation"],
)
def test_monai_bundle_run_refuses_an_override_no_config_defines(
    repo_root, synthetic_tree, tmp_path, args, typo, nearest
):
    """`monai.bundle run` takes any --ID as a new config id: a typo would be ignored (650 epochs for `--epoch 1`).
    The bundle's runs refuse it before any work, naming the nearest id; nothing is written."""
    bundle_root = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", str(bundle_root)]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert f"--{typo}: no config of this run defines that id (the nearest: --{nearest})" in result.stderr
    assert not bundle_root.exists(), "nothing is written"


@pytest.mark.parametrize("module", ["prepare_datalist", "synthetic_isles", "monailabel_app", "pacs", "make_studies"])
def test_a_tool_can_refuse_its_flags_before_torch_and_monai_are_imported(repo_root, module):
    """Importing the tool (what `python -m` does before `run` checks the flags) loads neither torch nor monai, which take
    seconds on a small CPU: a mistyped flag is refused at once, and the tool imports them when its work starts."""
    code = f"import sys, scripts.tools.{module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'monai'}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
