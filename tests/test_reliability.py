"""Reliability: bad input at every entry point is one clear line naming the thing, a failing
executor-side batch is reported by stage, partition and row batch, configured paths stay under
their declared roots, and the source tree never unpickles what it did not write.

Retries after a task failure and real process kills run under spark-submit, where Spark's
retry settings and a separate process exist: see tests/test_deploy.py (the scheduled chain).
"""

from __future__ import annotations

import ast
import gc
import logging
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow as pa
import pytest
import torch
from pydantic import BaseModel
from pyspark.sql import types as T

from models.encoders import TitleEncoder
from models.mrnet import BiLSTMTitles, MRNet, TaskHead
from pipelines.cli import main
from pipelines.core.config import Config, load_config
from pipelines.core.errors import ConfigError
from pipelines.core.faults import FAULT_VARIABLE, named_batches, task_error
from pipelines.core.tracking import stage_run, tracking_uri
from pipelines.core.workers import settle
from pipelines.model_types.contract import InputLayout
from pipelines.model_types.serving import ModelSpec
from pipelines.stages.embed import embed_frame

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CSV = "sku,name\na1,Blue Shirt\na2,Red Shoe\n"


def _roots_overlay(d: Path) -> Path:
    """A config file confining paths to <d>/data, workdir <d>/work (as conf/cluster.yaml)."""
    return _write(
        d / "roots.yaml", f"workdir: {d / 'work'}\npaths:\n  allowed_roots: [{d / 'data'}]\n"
    )


def case(name: str, argv, message: str, env: dict[str, str] | None = None):
    """One entry point fed bad input: argv built in a scratch folder, the line it must print."""
    return pytest.param(argv, message, env or {}, id=name)


BAD_INPUT = [
    case(
        "config-wrong-type",
        lambda d: [
            "config",
            "--conf",
            str(_write(d / "o.yaml", "clean:\n  max_title_chars: many\n")),
        ],
        "'clean.max_title_chars'",
    ),
    case(
        "config-unknown-key",
        lambda d: [
            "config",
            "--conf",
            str(_write(d / "o.yaml", "clean:\n  max_title_charz: 10\n")),
        ],
        "unknown key 'clean.max_title_charz'",
    ),
    case(
        "config-not-a-mapping",
        lambda d: ["config", "--conf", str(_write(d / "o.yaml", "- clean\n- embed\n"))],
        "top level must be a mapping, got list",
    ),
    case(
        "config-bad-yaml",
        lambda d: ["config", "--conf", str(_write(d / "o.yaml", "clean: [1, 2\n"))],
        "o.yaml: not valid YAML at line 2, column 1",
    ),
    case(
        "config-file-missing",
        lambda d: ["config", "--conf", str(d / "gone.yaml")],
        "gone.yaml does not exist",
    ),
    case("override-wrong-type", lambda d: ["config", "train.epochs=[1]"], "'train.epochs'"),
    case(
        "env-variable-unset",
        lambda d: [
            "config",
            "--conf",
            str(_write(d / "o.yaml", "workdir: ${PRODVEC_TEST_UNSET_VARIABLE}\n")),
        ],
        "environment variable PRODVEC_TEST_UNSET_VARIABLE is not set",
    ),
    case(
        "path-outside-roots",
        lambda d: [
            "config",
            "--conf",
            str(_roots_overlay(d)),
            "catalog.synthetic=null",
            "catalog.path=/etc/passwd",
        ],
        "catalog.path=/etc/passwd is outside the allowed roots",
    ),
    case(
        "override-widens-roots",
        lambda d: ["config", "--conf", str(_roots_overlay(d)), "paths.allowed_roots=[]"],
        "paths.* is set in config files (--conf) only",
    ),
    case(
        "override-workdir-is-not-a-root",
        lambda d: [
            "config",
            "--conf",
            str(_roots_overlay(d)),
            "workdir=/",
            "catalog.synthetic=null",
            "catalog.path=/etc/passwd",
        ],
        "catalog.path=/etc/passwd is outside the allowed roots",
    ),
    case(
        "adhoc-output-outside-roots",
        lambda d: [
            "embed",
            "--conf",
            str(_roots_overlay(d)),
            "--input",
            str(_write(d / "data" / "c.csv", CSV)),
            "--output",
            "/tmp/prodvec-elsewhere",
        ],
        "--output=/tmp/prodvec-elsewhere is outside the allowed roots",
    ),
    case(
        "config-yaml-aliases",
        lambda d: [
            "config",
            "--conf",
            str(_write(d / "o.yaml", "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n")),
        ],
        "o.yaml: not valid YAML at line 2, column 8: aliases (*a) are not allowed",
    ),
    case(
        "config-too-large",
        lambda d: ["config", "--conf", str(_write(d / "o.yaml", "#" * (2 << 20)))],
        "o.yaml: 2,097,152 bytes, more than a config file's 1,048,576",
    ),
    case(
        "config-not-utf8",
        lambda d: [
            "config",
            "--conf",
            str(_write(d / "o.yaml", "seed: 1 # café\n".encode("latin-1"))),
        ],
        "o.yaml: not UTF-8 text (byte 0xe9 at offset 13)",
    ),
    case(
        "override-malformed", lambda d: ["config", "key=[1,"], "override 'key=[1,': not valid YAML"
    ),
    case(
        "log-level-unknown",
        lambda d: ["config", "--log-level", "verbose"],
        "argument --log-level: invalid choice: 'VERBOSE'",
    ),
    case(
        "catalog-file-missing",
        lambda d: [
            "clean",
            f"workdir={d}",
            "catalog.synthetic=null",
            f"catalog.path={d / 'none.csv'}",
        ],
        "none.csv does not exist",
    ),
    case(
        "catalog-wrong-format",
        lambda d: [
            "clean",
            f"workdir={d}",
            "catalog.synthetic=null",
            "catalog.format=parquet",
            f"catalog.path={_write(d / 'c.parquet', CSV)}",
        ],
        "c.parquet cannot be read as parquet",
    ),
    case(
        "catalog-column-missing",
        lambda d: [
            "clean",
            f"workdir={d}",
            "catalog.synthetic=null",
            "catalog.columns.title=title",
            f"catalog.path={_write(d / 'c.csv', CSV)}",
        ],
        "'title'",
    ),
    case(
        "model-uri-unknown",
        lambda d: ["embed", f"workdir={d}", "--model", "models:/prodvec-no-such-model@candidate"],
        "cannot resolve models:/prodvec-no-such-model@candidate",
    ),
    case(
        "fault-variable-malformed",
        lambda d: ["clean", f"workdir={d}", "catalog.synthetic.rows=50"],
        f"{FAULT_VARIABLE}: 'clean:explode' is not <stage>:<mode>",
        {FAULT_VARIABLE: "clean:explode"},
    ),
]


@pytest.mark.parametrize(("argv", "message", "env"), BAD_INPUT)
def test_bad_input_is_one_line_naming_the_thing(
    spark, tmp_path, monkeypatch, capsys, shared_tracking, argv, message, env
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = argv(tmp_path)
    try:
        code = main(args if args[0] == "config" else [*args, shared_tracking])
    except SystemExit as usage_error:  # argparse's own checks
        code = usage_error.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("prodvec: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


# ---- executor-side failures ------------------------------------------------------------------


def test_a_failing_executor_batch_is_one_line_naming_stage_and_batch(
    spark, tmp_path, monkeypatch, capsys, shared_tracking
):
    """The shared test session makes one attempt per task, so the injected failure of
    partition 0 fails the stage: the CLI prints the executor's TaskError line, exit 1."""
    monkeypatch.setenv(FAULT_VARIABLE, "clean:fail")
    assert (
        main(["clean", f"workdir={tmp_path}", "catalog.synthetic.rows=100", shared_tracking]) == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"prodvec: error: stage clean, partition 0 \(attempt 0\), row batch 0 \(\d+ rows, "
        r"product_id 'SKU\d+'\.\.'SKU\d+'\): InjectedFault: injected failure in stage clean "
        r"\(first attempt\)\n",
        err,
    ), err
    assert not (tmp_path / "synthetic" / "clean" / "catalog" / "_SUCCESS").exists()


def test_a_real_executor_error_in_embed_names_the_row_batch(spark, tmp_path):
    """A model copy the executor cannot read (its vocabulary is missing): the worker's own
    FileNotFoundError reaches the driver as the TaskError of that batch."""
    torch.manual_seed(0)
    module = TitleEncoder(
        MRNet(BiLSTMTitles(50, 8, 8), [TaskHead("flag", "binary", 1, scalar=True)]), 12
    )
    folder = tmp_path / "model"
    # As the train stage logs it, but without extra_files/vocabulary.parquet.
    mlflow.pytorch.save_model(
        module.eval(), str(folder), serialization_format="pickle", pip_requirements=[]
    )
    spec = ModelSpec(
        "models:/broken/1", "broken", "1", str(folder), "mrnet", InputLayout(max_len=12), 8, 64, 64
    )
    schema = T.StructType(
        [
            T.StructField(name, T.StringType(), False)
            for name in ("product_id", "content_hash", "title")
        ]
    )
    frame = spark.createDataFrame(
        [(f"p{i:03d}", f"h{i}", "blue shirt") for i in range(40)], schema
    ).coalesce(1)
    embedded, _ = embed_frame(frame, spec)
    with pytest.raises(Exception) as caught:
        embedded.collect()
    failed = task_error(caught.value)
    assert failed is not None, str(caught.value)[:2000]
    assert re.fullmatch(
        r"stage embed, partition 0 \(attempt 0\), row batch 0 \(40 rows, "
        r"product_id 'p000'\.\.'p039'\): FileNotFoundError: .*vocabulary"
        r"\.parquet.*",
        str(failed),
    ), str(failed)


def test_executor_workers_are_settled_after_a_steps_first_batch(spark):
    """A worker's first batch loads the step's modules; `named_batches` then freezes them, so
    pyspark's collection after each task no longer walks them. The driver is left alone."""

    def freeze_counts(batches):
        def step(batch: pa.RecordBatch) -> pa.RecordBatch:
            if batch.column("i")[0].as_py() == 0:
                gc.unfreeze()  # as a fresh worker: nothing frozen yet
            return pa.RecordBatch.from_pydict(
                {"i": batch.column("i"), "frozen": [gc.get_freeze_count()] * batch.num_rows}
            )

        return named_batches("upkeep", batches, step)

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "5")
    try:
        rows = (
            spark.range(20)
            .selectExpr("CAST(id AS INT) AS i")
            .coalesce(1)
            .mapInArrow(freeze_counts, "i int, frozen long")
            .collect()
        )
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    frozen = {row.i: row.frozen for row in rows}
    assert frozen[0] == 0 and all(frozen[i] > 0 for i in range(5, 20)), frozen
    before = gc.get_freeze_count()
    settle()
    assert gc.get_freeze_count() == before


# ---- training processes outlive no driver ---------------------------------------------------


@pytest.mark.slow
def test_a_training_process_exits_when_its_local_driver_is_killed():
    """torchrun's processes are the driver's grandchildren: SIGKILL on the driver reaches
    neither, so each one watches the driver's pid (pipelines.training.loop.exit_with_driver)."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    program = (
        "import time; from pipelines.training.loop import exit_with_driver; "
        f"exit_with_driver({driver.pid}, every_seconds=0.1); time.sleep(120)"
    )
    trainer = subprocess.Popen(
        [sys.executable, "-c", program], cwd=Path(__file__).resolve().parent.parent
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # alive while the driver is
            trainer.wait(timeout=5)
        driver.kill()
        driver.wait()  # reaped, as the scheduler that started it would
        assert trainer.wait(timeout=20) == 1
    finally:
        driver.kill()
        trainer.kill()


# ---- paths confined to declared roots --------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "inside"),
    [
        ("catalog.path={data}/flipkart/products.csv", True),
        ("catalog.path={work}/raw/products.csv", True),  # the workdir is always allowed
        ("catalog.path={data}/../secrets.csv", False),  # '..' resolved before the check
        ("catalog.path={link}/passwd", False),  # a symlink out of the root
        ("catalog.path=/etc/passwd", False),
        ("catalog.path={data}-evil/products.csv", False),  # a sibling sharing the prefix
        ("embed.table_path={work}/tables/embeddings", True),
        ("embed.table_path=/tmp/elsewhere/table", False),
        ("tracking.artifact_location=file://{work}/mlartifacts", True),
        ("tracking.artifact_location=file:///var/mlartifacts", False),
        ("embed.model_uri={data}/../models/model", False),  # a model folder is a path too
        ("embed.model_uri=models:/prodvec-mrnet-synthetic@candidate", True),  # registry: not a path
        ("embed.table_path=s3a://bucket/prodvec/table", True),
        ("embed.table_path=s3a://bucket/prodvec-evil/table", False),
        ("embed.table_path=s3a://bucket/prodvec/../other/table", False),
    ],
)
def test_configured_paths_stay_under_the_allowed_roots(tmp_path, setting, inside):
    data, work, link = tmp_path / "data", tmp_path / "work", tmp_path / "data" / "etc"
    data.mkdir()
    link.symlink_to("/etc")
    roots = _write(
        tmp_path / "roots.yaml",
        f"workdir: {work}\npaths:\n  allowed_roots: [{data}, s3a://bucket/prodvec]\n",
    )
    overrides = [setting.format(data=data, work=work, link=link)]
    if setting.startswith("catalog.path"):
        overrides.insert(0, "catalog.synthetic=null")
    if inside:
        load_config([str(roots)], overrides)
    else:
        with pytest.raises(ConfigError, match=r"is outside the allowed roots"):
            load_config([str(roots)], overrides)


def test_without_roots_paths_are_not_confined(tmp_path):
    config = load_config(overrides=["catalog.synthetic=null", "catalog.path=/etc/passwd"])
    assert config.paths.allowed_roots == [] and config.catalog.path == "/etc/passwd"


# ---- secrets only from the environment -------------------------------------------------------

_SECRET_NAME = re.compile(r"(?i)token|password|passwd|secret|credential|api_?key|access_?key")


def _field_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        names.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.extend(_field_names(annotation, f"{prefix}{name}."))
    return names


SECRET = "s3cr3t-from-the-environment"


@pytest.fixture
def secret_overlay(tmp_path, monkeypatch) -> Path:
    """An overlay with a credential from the environment, a credential-named Spark setting
    and a tracking URI with user-info, as a cluster overlay may have them."""
    monkeypatch.setenv("PRODVEC_TEST_SECRET", SECRET)
    return _write(
        tmp_path / "secret.yaml",
        "spark:\n  conf:\n"
        "    spark.hadoop.fs.s3a.secret.key: literal-key-in-a-file\n"
        "    spark.hadoop.fs.s3a.endpoint: ${PRODVEC_TEST_SECRET}\n"
        "catalog:\n  name: secret\n  path: /nowhere/${PRODVEC_TEST_SECRET}.csv\n"
        "  columns: {product_id: id, title: title}\n",
    )


def _leaks(text: str) -> list[str]:
    return [s for s in (SECRET, "literal-key-in-a-file", "bob:pw") if s in text]


def test_printed_config_masks_environment_values_and_credentials(secret_overlay, capsys):
    uri = "tracking.uri=http://bob:pw@mlflow.example:5000"
    assert main(["config", "--conf", str(secret_overlay), uri]) == 0
    out = capsys.readouterr().out
    assert not _leaks(out), out
    assert "spark.hadoop.fs.s3a.secret.key: '***'" in out and "http://***@mlflow.example" in out


def test_error_lines_and_logs_mask_environment_values(
    secret_overlay, tmp_path, capsys, caplog, shared_tracking
):
    argv = ["clean", "--conf", str(secret_overlay), f"workdir={tmp_path}", shared_tracking]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "/nowhere/***.csv" in err and not _leaks(err), err
    logging.getLogger("prodvec.test").warning("endpoint %s", SECRET)
    assert "endpoint ***" in caplog.text and not _leaks(caplog.text), caplog.text


def test_mlflow_params_and_config_artifact_mask_secrets(secret_overlay, tmp_path):
    config = load_config([str(secret_overlay)], [f"workdir={tmp_path}"])
    with stage_run(config, "clean") as run:
        run_id = run.info.run_id
    client = mlflow.MlflowClient(tracking_uri(config))
    params = client.get_run(run_id).data.params
    assert params["spark.conf.spark.hadoop.fs.s3a.secret.key"] == "***"
    assert not _leaks(repr(params)), params
    artifact = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert not _leaks(artifact.read_text()) and "***" in artifact.read_text()
    assert (tmp_path / "mlflow.db").stat().st_mode & 0o777 == 0o600


def test_no_configuration_key_can_hold_a_secret():
    """Unknown keys are errors, so with no secret-like key a secret cannot sit in a config
    file; tokens reach MLflow and storage clients from their environment variables."""
    names = _field_names(Config)
    assert "tracking.uri" in names and "embed.table_path" in names  # the walk sees nesting
    assert not [name for name in names if _SECRET_NAME.search(name)]


@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_overlays_carry_no_literal_credentials(path):
    text = path.read_text()
    assert not re.search(r"(?i)(AKIA[0-9A-Z]{16}|://[^/\s:@]+:[^/\s@]+@)", text)  # keys, user:pw@


# ---- no unpickling of untrusted files ----------------------------------------------------------

SOURCE_DIRS = ("pipelines", "models", "jobs", "bench", "deploy")
# Full-object (pickle) model loads, allowed only on models from our own MLflow registry or a
# folder that passed the path confinement of embed.model_uri: embed (the stage's model),
# evaluate (the model URI the embed commit recorded), the embed bench.
PICKLED_MODEL_LOADERS = {
    "pipelines/model_types/serving.py",
    "pipelines/stages/evaluate.py",
    "bench/embed.py",
}


def _dotted(node: ast.AST) -> str:
    return ast.unparse(node) if isinstance(node, ast.Attribute | ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, relative: str) -> list[str]:
    """Every construct that can run code from a file or string, found in `source`."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            problems += [
                f"imports {m}"
                for m in modules
                if m.split(".")[0] in ("pickle", "cPickle", "dill", "shelve", "marshal", "joblib")
            ]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            problems.append("torch.load without weights_only=True")
        elif name.endswith(("np.load", "numpy.load")) and _is_true(_keyword(node, "allow_pickle")):
            problems.append("np.load(allow_pickle=True)")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(f"{name} (use yaml.safe_load)")
        elif name in ("eval", "exec"):
            problems.append(f"{name}()")
        elif name.startswith("subprocess.") and _is_true(_keyword(node, "shell")):
            problems.append(f"{name}(shell=True)")
        elif name.endswith("pytorch.load_model") and relative not in PICKLED_MODEL_LOADERS:
            problems.append("mlflow.pytorch.load_model outside the registry loaders")
    return problems


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("import pickle", "imports pickle"),
        ("from joblib import load", "imports joblib"),
        ("torch.load(path)", "torch.load without weights_only=True"),
        ("torch.load(path, weights_only=False)", "torch.load without weights_only=True"),
        ("np.load(path, allow_pickle=True)", "np.load(allow_pickle=True)"),
        ("yaml.load(text)", "yaml.load (use yaml.safe_load)"),
        ("eval(text)", "eval()"),
        ("subprocess.run(cmd, shell=True)", "subprocess.run(shell=True)"),
        (
            "mlflow.pytorch.load_model(uri)",
            "mlflow.pytorch.load_model outside the registry loaders",
        ),
        ("torch.load(path, weights_only=True)", None),
        ("yaml.safe_load(text)", None),
    ],
)
def test_the_scanner_finds_each_unsafe_construct(snippet, problem):
    assert unsafe_calls(snippet, "pipelines/x.py") == ([problem] if problem else [])


def test_source_tree_loads_nothing_unsafely():
    files = [path for folder in SOURCE_DIRS for path in (REPO / folder).rglob("*.py")]
    assert len(files) > 20
    problems = {
        str(path.relative_to(REPO)): found
        for path in files
        if (found := unsafe_calls(path.read_text(), str(path.relative_to(REPO))))
    }
    assert not problems
