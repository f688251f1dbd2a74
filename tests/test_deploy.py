"""Production shape: the built wheel runs every stage under pyspark's own `spark-submit`,
chained as a scheduler chains them (one process per stage, the cluster overlay plus local
overrides, nothing shared but the workdir and the MLflow store), and survives what a cluster
does to jobs: a task that fails once is retried by Spark with the same output (clean, embed),
the embed job killed between writing and committing leaves no version and its retry commits,
training killed mid-epoch resumes from its checkpoint when the scheduler retries it.

Then the scheduling files: the Airflow DAG's task graph and schedules (parsed with ast:
Airflow is too heavy to install here), the spark-operator manifests against the fields
spark-operator requires, and the Dockerfiles.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyspark
import pytest
import torch
import yaml
from deltalake import DeltaTable

from pipelines.core.config import load_config
from pipelines.stages import clean
from pipelines.stages.registry import STAGES
from pipelines.table import EmbeddingTable, vacuum

REPO = Path(__file__).resolve().parent.parent
SPARK_SUBMIT = Path(pyspark.__file__).parent / "bin" / "spark-submit"
BUILT = [stage.name for stage in STAGES]
ROWS = 400
# The cluster overlay as a scheduler passes it, plus what makes it small and local.
OVERRIDES = [
    f"catalog.synthetic.rows={ROWS}",
    "spark.shuffle_partitions=2",
    "word2vec.epochs=2",
    "train.epochs=2",
    "train.batch_size=16",
    "train.checkpoint_every_steps=2",
]
# Downstream stages' own small settings, passed to their job only (they may be absent).
STAGE_OVERRIDES = {
    "evaluate": ["evaluate.folds=2", "evaluate.forest_trees=10", "evaluate.tsne_rows=0"]
}


@dataclass
class Submitted:
    stage: str
    returncode: int
    output: str  # stdout and stderr: spark-submit merges the Python driver's into stdout
    seconds: float


@dataclass
class Chain:
    root: Path
    workdir: Path
    runs: list[Submitted]

    def run(self, stage: str, index: int = -1) -> Submitted:
        return [run for run in self.runs if run.stage == stage][index]

    @property
    def config(self):
        return load_config(
            ["cluster"],
            [
                *OVERRIDES,
                f"workdir={self.workdir}",
                f"tracking.uri=sqlite:///{self.root / 'mlflow.db'}",
            ],
        )


def _environment(release: Path, root: Path, fault: str | None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYSPARK_GATEWAY", "PRODVEC_"))
    }
    env.update(
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        SPARK_LOCAL_IP="127.0.0.1",
        PRODVEC_CONF_DIR=str(release / "conf"),
        PRODVEC_WORKDIR=str(root / "work"),
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
    )
    if fault:
        env["PRODVEC_INJECT_FAULT"] = fault
    return env


def _command(release: Path, stage: str, root: Path, master: str, extra: list[str]) -> list[str]:
    """What a scheduler runs: spark-submit <job> --conf cluster <overrides>."""
    archive = next(release.glob("prodvec-*.zip"))
    return [
        str(SPARK_SUBMIT),
        "--master",
        master,
        "--py-files",
        str(archive),
        "--conf",
        (
            "spark.driver.extraJavaOptions=-Dlog4j2.configurationFile="
            f"file:{release / 'conf' / 'log4j2.properties'}"
        ),
        str(release / "jobs" / f"{stage}.py"),
        "--conf",
        "cluster",
        *OVERRIDES,
        *STAGE_OVERRIDES.get(stage, []),
        f"tracking.artifact_location={(root / 'work' / 'mlartifacts').as_uri()}",
        *extra,
    ]


def _submit(
    release: Path,
    stage: str,
    root: Path,
    fault: str | None = None,
    kill_when=None,
    master: str = "local[2,2]",
    extra: tuple[str, ...] = (),
) -> Submitted:
    """Run one job to its end, or SIGKILL it and all its processes once `kill_when(output)`;
    on `master` (local mode by default), `extra` overrides after the usual ones."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{stage}-{len(list(logs.glob(f'{stage}-*.log')))}.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(
            _command(release, stage, root, master, list(extra)),
            cwd=root,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_environment(release, root, fault),
            start_new_session=True,
        )
        while kill_when is not None and process.poll() is None:
            if kill_when(log.read_text()):
                _kill_tree(process.pid)
                break
            time.sleep(0.1)
        returncode = process.wait(timeout=600)
    return Submitted(stage, returncode, log.read_text(), time.perf_counter() - started)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (torchrun starts its training processes in
    sessions of their own, out of reach of a process-group kill)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL the job and everything it started, as a lost node or container takes them."""
    for victim in [pid, *_descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            continue


def _mid_epoch_checkpoint(run_dir: Path):
    """kill_when for training: a checkpoint saved in the middle of an epoch exists."""

    def ready(_output: str) -> bool:
        last = run_dir / "last.pt"
        try:
            return torch.load(last, map_location="cpu", weights_only=True)["step"] > 0
        except (FileNotFoundError, EOFError, RuntimeError):
            return False

    return ready


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """`make dist` on a copy of the checkout (nothing is written inside the checkout), then
    the wheel's archive, conf/ and jobs/ copied together, as the job image copies them: code
    and configuration from one moment of the checkout."""
    source = tmp_path_factory.mktemp("source")
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("pipelines", "models"):
        shutil.copytree(
            REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    subprocess.run(
        ["make", "dist", f"VENV={Path(sys.executable).parent.parent}"],
        cwd=source,
        check=True,
        capture_output=True,
    )
    wheels = sorted((source / "dist").glob("prodvec-*.whl"))
    assert len(wheels) == 1
    folder = tmp_path_factory.mktemp("release")
    for name in ("conf", "jobs"):
        shutil.copytree(REPO / name, folder / name)
    shutil.copy(wheels[0], folder)
    shutil.copy(wheels[0].with_suffix(".zip"), folder)
    return folder


@pytest.fixture(scope="module")
def archive(release) -> Path:
    """The wheel as .zip for --py-files (Spark puts only .zip/.egg/.jar on executors' path)."""
    return next(release.glob("prodvec-*.zip"))


@pytest.fixture(scope="module")
def chain(release, tmp_path_factory) -> Chain:
    """Every built stage, in order, each its own spark-submit; train and embed are killed
    once and retried as a scheduler retries a failed task."""
    root = tmp_path_factory.mktemp("submit")
    workdir = root / "work"
    runs: list[Submitted] = []
    for stage in BUILT:
        if not (release / "jobs" / f"{stage}.py").is_file():
            continue  # test_every_built_stage_has_a_job says so
        if stage == "train":
            run_dir = workdir / "synthetic" / "train" / "model"
            runs.append(_submit(release, stage, root, kill_when=_mid_epoch_checkpoint(run_dir)))
        if stage == "embed":
            runs.append(
                _submit(
                    release,
                    stage,
                    root,
                    fault="embed:hang-commit",
                    kill_when=lambda err: "injected hang-commit" in err,
                )
            )
        fault = f"{stage}:fail" if stage in ("clean", "embed") else None
        runs.append(_submit(release, stage, root, fault=fault))
        assert runs[-1].returncode == 0, f"{stage} failed:\n{runs[-1].output[-3000:]}"
    return Chain(root, workdir, runs)


@pytest.mark.spark_submit
def test_dist_builds_a_wheel_with_the_packages(archive):
    import zipfile

    names = zipfile.ZipFile(archive.with_suffix(".whl")).namelist()
    assert "pipelines/cli.py" in names and "models/mrnet.py" in names
    assert "pipelines/data/taxonomy.yaml" in names  # package data: the synthetic catalog
    assert archive.read_bytes() == archive.with_suffix(".whl").read_bytes()


def test_every_built_stage_has_a_job():
    missing = [name for name in BUILT if not (REPO / "jobs" / f"{name}.py").is_file()]
    assert not missing, f"built stages without jobs/<stage>.py: {missing}"


@pytest.mark.spark_submit
def test_every_stage_ran_from_the_wheel_and_exited_0(chain, archive):
    finished = [run for run in chain.runs if run.returncode == 0]
    assert [run.stage for run in finished] == [
        name for name in BUILT if (REPO / "jobs" / f"{name}.py").is_file()
    ]
    for run in finished:
        # The driver imported the archive spark-submit shipped, not the checkout.
        assert re.search(
            rf"prodvec \S+ from \S*/{re.escape(archive.name)}/pipelines", run.output
        ), run.output[:2000]
        assert f"{run.stage}: {{" in run.output  # the CLI's one-line result
    times = ", ".join(f"{run.stage} {run.seconds:.0f}s rc={run.returncode}" for run in chain.runs)
    print(f"spark-submit chain: {times}")


@pytest.mark.spark_submit
def test_outputs_of_the_chain(chain):
    config = chain.config
    catalog = pq.read_table(config.outputs.clean_catalog)
    assert 0 < catalog.num_rows <= ROWS
    assert (config.outputs.word2vec).is_file()
    assert (config.outputs.shards / "manifest.json").is_file()
    table = EmbeddingTable.from_config(config)
    assert table.version() == 0
    snapshot = table.snapshot()
    assert sum(pq.read_metadata(f).num_rows for f in snapshot.files) == catalog.num_rows
    commit = table.commit_info()
    assert str(commit).count("models:/prodvec-mrnet-synthetic/1") >= 1


@pytest.mark.spark_submit
def test_a_task_failing_once_is_retried_and_clean_output_equals_an_unfailed_run(
    chain, spark, archive, tmp_path
):
    retried = chain.run("clean")
    assert "prodvec: injected fail in stage clean" in retried.output
    # The failed attempt ran the archive's code on the executor, and Spark retried it.
    assert f"{archive.name}/pipelines/core/faults.py" in retried.output
    assert re.search(r"Lost task \d+\.0 in stage", retried.output), retried.output[-3000:]
    assert "InjectedFault" in retried.output
    unfailed = load_config(overrides=[*OVERRIDES, f"workdir={tmp_path}"])
    clean.run(spark, unfailed)
    for output in ("catalog", "quarantine"):
        ours = pq.read_table(chain.config.outputs.stage("clean") / output)
        reference = pq.read_table(unfailed.outputs.stage("clean") / output)
        key = "product_id" if output == "catalog" else "source_row"
        ours, reference = ours.sort_by(key), reference.sort_by(key)
        if output == "quarantine":  # the source file's folder is each run's own workdir
            ours, reference = ours.drop(["source_file"]), reference.drop(["source_file"])
        assert ours.equals(reference), output


def _rows(files: list[str]) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.select(["product_id", "content_hash", "model_version", "embedding"]).sort_by(
        "product_id"
    )


@pytest.mark.spark_submit
def test_embed_killed_before_commit_leaves_no_version_and_its_retry_equals_it(chain):
    killed, retried = chain.run("embed", 0), chain.run("embed", 1)
    assert killed.returncode == -signal.SIGKILL
    assert "injected hang-commit in stage embed" in killed.output
    # The retry's one task failure was retried by Spark, then one version was committed.
    assert "prodvec: injected fail in stage embed" in retried.output
    assert re.search(r"Lost task \d+\.0 in stage", retried.output), retried.output[-3000:]
    assert "InjectedFault" in retried.output
    table = EmbeddingTable.from_config(chain.config)
    assert table.version() == 0 and len(DeltaTable(table.uri).history()) == 1
    committed = set(table.snapshot().files)
    orphans = sorted(
        {str(Path(table.uri) / name) for name in vacuum(table.uri, dry_run=True, retention_hours=0)}
    )
    # The killed run's files: written in full, never visible, and the same rows as the
    # committed version that went through a failed-and-retried task.
    assert orphans and not committed & set(orphans)
    assert _rows(orphans).equals(_rows(sorted(committed)))


@pytest.mark.spark_submit
def test_training_killed_mid_epoch_resumes_when_retried(chain):
    import json

    killed, retried = chain.run("train", 0), chain.run("train", 1)
    assert killed.returncode == -signal.SIGKILL
    result = json.loads((chain.config.outputs.training / "model" / "result.json").read_text())
    assert result["resumed_from"] is not None, result
    resumed = result["resumed_from"]["global_step"]
    assert 0 < resumed and result["steps_this_run"] == result["global_step"] - resumed
    assert result["epochs_run"] == 2
    assert "prodvec-mrnet-synthetic" in retried.output


# ---- the scheduling files ------------------------------------------------------------------

DEPLOY = REPO / "deploy"
CORE = tuple(BUILT)  # every built stage has a manifest
GPU_STAGES = ("image_features", "train", "embed")
IN_IMAGE_JOBS = "local:///opt/prodvec/jobs"


def _dag_module() -> ast.Module:
    return ast.parse((DEPLOY / "airflow" / "prodvec_dag.py").read_text())


def _constants(module: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments."""
    found = {}
    for node in module.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def _function(module: ast.Module, name: str) -> ast.FunctionDef:
    return next(
        node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == name
    )


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    return [
        call
        for call in ast.walk(node)
        if isinstance(call, ast.Call)
        and getattr(call.func, "id", getattr(call.func, "attr", None)) == name
    ]


def dag_graph() -> dict[str, dict[str, object]]:
    """{dag_id: {"schedule": ..., "edges": [(upstream, downstream)], "tasks": [...]}} read from
    the DAG file's syntax tree: the build() calls, the schedule table and the chaining loop."""
    module = _dag_module()
    constants = _constants(module)
    build = _function(module, "build")
    dag_call = _calls(build, "DAG")[0]
    keywords = {kw.arg: kw.value for kw in dag_call.keywords}
    assert ast.unparse(keywords["schedule"]) == "SCHEDULES[dag_id]"
    # tasks = [submit(stage) for stage in stages]; for a, b in pairwise(tasks): a >> b
    assert any(
        isinstance(node, ast.ListComp) and ast.unparse(node.elt) == "submit(stage)"
        for node in ast.walk(build)
    )
    loop = next(node for node in ast.walk(build) if isinstance(node, ast.For))
    assert ast.unparse(loop.iter) == "pairwise(tasks)"
    assert ast.unparse(loop.body[0]) == "upstream >> downstream"
    graphs = {}
    for call in _calls(module, "build"):
        if call in _calls(build, "build"):
            continue
        dag_id, stages = ast.literal_eval(call.args[0]), constants[call.args[1].id]
        graphs[dag_id] = {
            "schedule": constants["SCHEDULES"][dag_id],
            "tasks": list(stages),
            "edges": list(pairwise(stages)),
        }
    return graphs


def test_dag_file_is_valid_python_with_spark_submit_tasks():
    module = _dag_module()
    compile(module, "prodvec_dag.py", "exec")
    submit = _function(module, "submit")
    operator = _calls(submit, "SparkSubmitOperator")[0]
    keywords = {kw.arg: ast.unparse(kw.value) for kw in operator.keywords}
    assert keywords["task_id"] == "stage"
    assert keywords["application"] == "f'{JOBS}/{stage}.py'"
    assert _constants(module)["JOBS"] == IN_IMAGE_JOBS
    assert "--conf', 'cluster'" in keywords["application_args"]
    # Secrets stay out of the DAG: only templated Variables reach the job's environment.
    assert not re.search(r"(?i)(token|password|secret_key)\s*[:=]", keywords["env_vars"])


@pytest.mark.parametrize(
    ("dag_id", "schedule", "edges"),
    [
        ("prodvec_daily", "@daily", [("clean", "embed")]),
        (
            "prodvec_weekly_retrain",
            "@weekly",
            [("clean", "corpus"), ("corpus", "shard"), ("shard", "train"), ("train", "embed")],
        ),
    ],
)
def test_dag_task_graph_and_schedule(dag_id, schedule, edges):
    graph = dag_graph()[dag_id]
    assert graph["schedule"] == schedule
    assert graph["edges"][: len(edges)] == edges
    tasks = graph["tasks"]
    assert tasks == [name for name in BUILT if name in tasks], (
        "every task is a built stage, in data-flow order"
    )
    assert all((REPO / "jobs" / f"{name}.py").is_file() for name in tasks)


def test_daily_dag_embeds_incrementally_and_idempotently():
    module = _dag_module()
    graphs = dag_graph()
    assert "train" not in graphs["prodvec_daily"]["tasks"]  # same model: incremental embed
    arguments = next(
        node
        for node in module.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "STAGE_ARGUMENTS"
    )
    # One commit id per DAG run: a retried embed never commits the same day twice.
    assert re.search(r"embed\.app_id=.*\{\{ ds \}\}", ast.unparse(arguments.value))
    default_args = next(
        node
        for node in module.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DEFAULT_ARGS"
    )
    retries = dict(
        zip(
            [ast.literal_eval(k) for k in default_args.value.keys],
            default_args.value.values,
            strict=True,
        )
    )["retries"]
    assert ast.literal_eval(retries) >= 1


MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
_MEMORY = re.compile(r"^[1-9][0-9]*[mg]$")


def test_a_manifest_for_every_core_stage():
    assert {path.stem for path in MANIFESTS} >= set(CORE)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.stem)
def test_manifest_has_the_fields_spark_operator_requires(path):
    app = yaml.safe_load(path.read_text())
    assert app["apiVersion"] == "sparkoperator.k8s.io/v1beta2"
    assert app["kind"] == "SparkApplication"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", app["metadata"]["name"])
    spec = app["spec"]
    assert spec["type"] == "Python" and spec["mode"] == "cluster"
    assert spec["sparkVersion"] == pyspark.__version__  # the Spark the wheel pins
    assert spec["image"] and spec["restartPolicy"]["type"] in ("OnFailure", "Always", "Never")
    main = spec["mainApplicationFile"]
    assert main == f"{IN_IMAGE_JOBS}/{path.stem}.py"
    assert (REPO / "jobs" / f"{path.stem}.py").is_file()
    assert spec["arguments"][:2] == ["--conf", "cluster"]
    for role in ("driver", "executor"):
        assert isinstance(spec[role]["cores"], int) and spec[role]["cores"] >= 1
        assert _MEMORY.match(spec[role]["memory"])
    assert isinstance(spec["executor"]["instances"], int)
    # Secrets only through the environment, from a Secret: no literal values in manifests.
    for role in ("driver", "executor"):
        assert all("value" not in item for item in spec[role].get("env", []))
        assert {"secretRef": {"name": "prodvec-secrets"}} in spec[role]["envFrom"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.stem)
def test_gpu_stages_request_gpus_and_cpu_stages_do_not(path):
    spec = yaml.safe_load(path.read_text())["spec"]
    executor, conf = spec["executor"], spec["sparkConf"]
    if path.stem not in GPU_STAGES:
        assert "gpu" not in executor and not any("gpu" in key for key in conf)
        return
    gpu = executor["gpu"]
    assert gpu["name"] == "nvidia.com/gpu" and isinstance(gpu["quantity"], int)
    assert gpu["quantity"] >= 1 and executor["image"].endswith("-gpu")
    assert conf["spark.executor.resource.gpu.amount"] == str(gpu["quantity"])
    assert float(conf["spark.task.resource.gpu.amount"]) > 0
    assert conf["spark.executor.resource.gpu.discoveryScript"] == (
        "/opt/prodvec/bin/gpu-discovery.sh"
    )
    if path.stem == "train":  # one DDP process per GPU slot of the cluster
        processes = next(arg for arg in spec["arguments"] if arg.startswith("train.num_processes"))
        assert int(processes.split("=")[1]) == executor["instances"] * gpu["quantity"]


def _pins() -> dict[str, str]:
    text = (REPO / "setup.cfg").read_text()
    return dict(re.findall(r"^\s+([A-Za-z0-9_-]+)==([0-9.]+)", text, re.MULTILINE))


@pytest.mark.parametrize(
    ("dockerfile", "torch_index"),
    [
        ("Dockerfile", "whl/cpu"),
        ("Dockerfile.gpu", "whl/cu"),
    ],
)
def test_dockerfiles_build_the_job_image(dockerfile, torch_index):
    text = (DEPLOY / "docker" / dockerfile).read_text()
    assert "openjdk-17-jre-headless" in text
    assert re.search(
        rf"--index-url https://download\.pytorch\.org/{torch_index}\S* "
        rf"torch=={re.escape(_pins()['torch'])}",
        text,
    )
    assert "COPY dist/prodvec-*.whl" in text
    assert "COPY jobs /opt/prodvec/jobs" in text  # IN_IMAGE_JOBS of the DAG and manifests
    assert "PRODVEC_CONF_DIR=/opt/prodvec/conf" in text and "COPY conf /opt/prodvec/conf" in text
    assert "COPY deploy/docker/gpu-discovery.sh /opt/prodvec/bin/gpu-discovery.sh" in text
    assert ("[gpu]" in text) == dockerfile.endswith(".gpu")
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        assert list(REPO.glob(source)) or source.startswith("dist/"), source


def test_the_embed_manifest_commits_under_its_applications_name(monkeypatch):
    """A retried driver commits under the id of the first try: the application's name, which
    the operator puts on the driver as a label, reaches embed.app_id through the environment."""
    spec = yaml.safe_load((DEPLOY / "k8s" / "embed.yaml").read_text())["spec"]
    override = next(arg for arg in spec["arguments"] if arg.startswith("embed.app_id="))
    variable = re.fullmatch(r"embed\.app_id=\$\{(\w+)\}", override).group(1)
    source = next(item for item in spec["driver"]["env"] if item["name"] == variable)
    label = "metadata.labels['sparkoperator.k8s.io/app-name']"
    assert source["valueFrom"]["fieldRef"]["fieldPath"] == label
    monkeypatch.setenv(variable, "prodvec-embed-1733529600")
    config = load_config(["cluster"], [override])
    assert config.embed.app_id == "prodvec-embed-1733529600"


def test_the_gpu_image_has_faiss_gpu_instead_of_faiss_cpu():
    """Both wheels install the `faiss` module: the GPU image removes faiss-cpu, installs the
    [gpu] extra's faiss-gpu again over the files they shared, and fails its build without GPU
    support; the CPU image never sees faiss-gpu."""
    gpu_extra = re.search(
        r"^gpu =\s*\n\s+(faiss-gpu\S+)", (REPO / "setup.cfg").read_text(), re.MULTILINE
    )
    text = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    steps = [
        '"$(ls /tmp/prodvec-*.whl)[gpu]"',
        "pip uninstall -y faiss-cpu",
        f'--force-reinstall --no-deps "{gpu_extra.group(1)}"',
        "hasattr(faiss, 'StandardGpuResources')",
    ]
    where = [text.find(step) for step in steps]
    assert -1 not in where and where == sorted(where), dict(zip(steps, where, strict=True))
    assert "faiss-gpu" not in (DEPLOY / "docker" / "Dockerfile").read_text()


@pytest.mark.cluster
@pytest.mark.spark_submit
def test_the_chain_on_a_standalone_cluster_embeds_every_clean_product(
    release, standalone_cluster, spark, tmp_path
):
    """clean -> corpus -> shard -> train -> embed, each `spark-submit --master spark://...`
    of the wheel's archive as the DAG submits it, the workdir a file:// URI; training on two
    ranks in TorchDistributor's cluster mode, one per worker."""
    workdir = tmp_path / "work"
    extra = (f"workdir={workdir.as_uri()}", "train.distributed=true", "train.num_processes=2")
    runs = {}
    for stage in ("clean", "corpus", "shard", "train", "embed"):
        runs[stage] = _submit(release, stage, tmp_path, master=standalone_cluster, extra=extra)
        assert runs[stage].returncode == 0, f"{stage}:\n{runs[stage].output[-3000:]}"
    assert "launching 2 training processes (cluster mode" in runs["train"].output
    config = load_config(["cluster"], [*OVERRIDES, *extra])
    clean_ids = {
        row[0]
        for row in spark.read.parquet(str(config.outputs.clean_catalog))
        .select("product_id")
        .collect()
    }
    table = EmbeddingTable.from_config(config)
    embedded = pq.read_table(list(table.snapshot().files), columns=["product_id"])
    assert sorted(embedded["product_id"].to_pylist()) == sorted(clean_ids)
