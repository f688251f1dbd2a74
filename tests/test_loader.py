"""Training loader: exactly-once across ranks and workers, shuffling, resume, contract batches.

The shards here are written with pyarrow in the shard stage's format, with deliberately
uneven row groups (1 to 97 rows) and files, so that ranks and workers get unequal shares;
tests/test_shard.py runs the loader over the stage's own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.core.errors import ShardError
from pipelines.data.shards import FORMAT, MANIFEST, SPLITS, describe_files
from pipelines.training.loader import ShardDataset, make_loader, resume_point

MAX_LEN, CLASSES, NODES, TERMS, IMAGE_DIM = 6, 5, 7, 11, 3
# Rows per row group, per file: uneven on purpose (and more units than 2 ranks x 2 workers).
TRAIN_FILES = [[1, 37, 5, 64], [97, 2, 19], [13], [50, 3, 41, 8, 29]]
VALIDATION_FILES = [[7, 30], [4]]


def make_rows(first: int, n: int) -> pa.Table:
    """Rows whose every column encodes their global position, so a batch row can be
    checked against its row_id."""
    pos = np.arange(first, first + n)
    ids = np.zeros((n, MAX_LEN), dtype=np.int32)
    lengths = 1 + pos % MAX_LEN
    for i, length in enumerate(lengths):
        ids[i, :length] = 2 + (pos[i] + np.arange(length)) % 50
    nodes = [None if p % 10 == 0 else sorted({p % NODES, (p // 3) % NODES}) for p in pos]
    terms = [None if p % 9 == 0 else sorted({p % TERMS, (p * 7) % TERMS}) for p in pos]
    return pa.table(
        {
            "product_id": pa.array([f"p{p}" for p in pos]),
            "title_ids": pa.array(list(ids), type=pa.list_(pa.int32())),
            "title_len": pa.array(lengths, type=pa.int32()),
            "image_features": pa.array(
                [[0.0] * IMAGE_DIM if p % 6 == 0 else [p, p + 0.5, -p] for p in pos],
                pa.list_(pa.float32()),
            ),
            "image_missing": pa.array(pos % 6 == 0),
            "kind": pa.array([None if p % 7 == 0 else int(p % CLASSES) for p in pos], pa.int32()),
            "flag": pa.array([None if p % 5 == 0 else bool(p % 2) for p in pos], pa.bool_()),
            "score": pa.array([None if p % 4 == 0 else p / 10 for p in pos], pa.float32()),
            "path": pa.array(nodes, pa.list_(pa.int32())),
            "words_idx": pa.array(terms, pa.list_(pa.int32())),
            "words_val": pa.array(
                [None if t is None else [p + 0.5] * len(t) for p, t in zip(pos, terms)],
                pa.list_(pa.float32()),
            ),
        }
    )


def write_shards(root: Path, splits: dict[str, list[list[int]]]) -> Path:
    """Shard files with the given row groups per file, and their manifest."""
    counts = {}
    for split in SPLITS:
        (root / split).mkdir(parents=True)
        first = 0
        for index, groups in enumerate(splits.get(split, [])):
            with pq.ParquetWriter(
                root / split / f"part-{index:05d}.parquet", make_rows(0, 1).schema
            ) as writer:
                for rows in groups:
                    writer.write_table(make_rows(first, rows))
                    first += rows
        counts[split] = first
    manifest = {
        "format": FORMAT,
        "splits": counts,
        "files": {split: describe_files(root / split) for split in SPLITS},
        "max_len": {"title": MAX_LEN},
        "text_fields": {"title": {"ids": "title_ids", "len": "title_len"}},
        "image_features": {"dim": IMAGE_DIM},
        "tasks": [
            {"name": "kind", "kind": "multiclass", "num_outputs": CLASSES, "columns": ["kind"]},
            {"name": "flag", "kind": "binary", "num_outputs": 1, "columns": ["flag"]},
            {"name": "score", "kind": "regression", "num_outputs": 1, "columns": ["score"]},
            {"name": "path", "kind": "multilabel", "num_outputs": NODES, "columns": ["path"]},
            {
                "name": "words",
                "kind": "decoding",
                "num_outputs": TERMS,
                "columns": ["words_idx", "words_val"],
            },
        ],
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(
        tmp_path_factory.mktemp("shards"),
        {"train": TRAIN_FILES, "validation": VALIDATION_FILES, "test": [[3]]},
    )


def train_rows() -> int:
    return sum(map(sum, TRAIN_FILES))


def epoch(
    shards: Path, *, ranks: int = 2, workers: int = 2, batch_size: int = 16, **kwargs
) -> list[list[dict[str, torch.Tensor]]]:
    """Every rank's batches for one epoch, each rank through its own DataLoader."""
    return [
        list(
            make_loader(
                shards,
                "train",
                batch_size,
                rank=rank,
                world_size=ranks,
                num_workers=workers,
                **kwargs,
            )
        )
        for rank in range(ranks)
    ]


def real_ids(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    ids = np.concatenate([batch["row_id"].numpy() for batch in batches])
    return ids[ids >= 0]


@pytest.mark.parametrize("batch_size", [16, 50])
@pytest.mark.parametrize("epoch_number", [0, 1])
def test_every_row_exactly_once_over_2_ranks_x_2_workers(shards, batch_size, epoch_number):
    ranks = epoch(shards, batch_size=batch_size, seed=3, epoch=epoch_number)
    seen = np.concatenate([real_ids(batches) for batches in ranks])
    assert np.array_equal(np.sort(seen), np.arange(train_rows()))
    # DDP: every rank runs the same number of steps, as announced before the epoch.
    steps = [len(batches) for batches in ranks]
    dataset = ShardDataset(
        shards, "train", batch_size, seed=3, rank=0, world_size=2, num_workers=2, epoch=epoch_number
    )
    assert steps == [dataset.steps_per_epoch()] * 2
    assert dataset.batch_counts().sum() <= dataset.steps_per_epoch() * 2


def test_ranks_get_unequal_shares_and_the_short_one_pads(shards):
    """The uneven row groups give the ranks different row counts (else the padding path
    would go untested); padding batches carry no label and no row."""
    ranks = epoch(shards, batch_size=16, seed=3)
    rows = [len(real_ids(batches)) for batches in ranks]
    assert rows[0] != rows[1]
    pads = [batch for batches in ranks for batch in batches if (batch["row_id"] < 0).any()]
    assert pads, "expected padding batches on the rank with fewer rows"
    for batch in pads:
        assert (batch["row_id"] == -1).all()
        assert not any(batch[key].any() for key in batch if key.endswith("_mask"))
        assert (batch["title_len"] == 1).all() and not batch["title_ids"].any()
        assert batch["image_missing"].all() and not batch["image_features"].any()


def test_batches_hold_the_rows_their_row_ids_name(shards):
    """Contract dtypes and shapes, and every value is the stored one for that row_id."""
    table = pa.concat_tables(
        pq.read_table(shards / entry["path"])
        for entry in json.loads((shards / MANIFEST).read_text())["files"]["train"]
    )
    expected = table.to_pylist()
    for batch in epoch(shards, ranks=1, workers=2, batch_size=32, seed=9)[0]:
        size = len(batch["row_id"])
        assert (
            batch["title_ids"].shape == (size, MAX_LEN) and batch["title_ids"].dtype == torch.int64
        )
        assert batch["title_len"].dtype == torch.int64 and (batch["title_len"] >= 1).all()
        assert batch["image_features"].shape == (size, IMAGE_DIM)
        assert batch["image_features"].dtype == torch.float32
        assert batch["image_missing"].dtype == torch.bool
        assert batch["kind"].dtype == torch.int64 and batch["flag"].dtype == torch.float32
        assert batch["score"].dtype == torch.float32
        assert batch["path"].shape == (size, NODES) and batch["words"].shape == (size, TERMS)
        assert all(
            batch[f"{t}_mask"].dtype == torch.bool
            for t in ("kind", "flag", "score", "path", "words")
        )
        assert "product_id" not in batch
        for i, row_id in enumerate(batch["row_id"].tolist()):
            row = expected[row_id]
            assert batch["title_ids"][i].tolist() == row["title_ids"]
            assert batch["title_len"][i] == row["title_len"]
            assert batch["image_features"][i].tolist() == row["image_features"]
            assert bool(batch["image_missing"][i]) == row["image_missing"]
            for name in ("kind", "flag", "score"):
                assert bool(batch[f"{name}_mask"][i]) == (row[name] is not None)
                assert batch[name][i].item() == pytest.approx(float(row[name] or 0))
            assert bool(batch["path_mask"][i]) == (row["path"] is not None)
            assert np.flatnonzero(batch["path"][i].numpy()).tolist() == (row["path"] or [])
            words = batch["words"][i].numpy()
            assert np.flatnonzero(words).tolist() == (row["words_idx"] or [])
            assert words[row["words_idx"] or []].tolist() == pytest.approx(row["words_val"] or [])


def test_shuffle_is_seeded_and_changes_with_the_epoch(shards):
    def order(seed: int, epoch_number: int) -> list[int]:
        return real_ids(
            epoch(shards, ranks=1, workers=0, seed=seed, epoch=epoch_number)[0]
        ).tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != sorted(order(1, 0))


def test_set_epoch_reshuffles_a_loader(shards):
    loader = make_loader(shards, "train", 16, seed=1, num_workers=2)
    first = real_ids(list(loader)).tolist()
    loader.dataset.set_epoch(1)
    second = real_ids(list(loader)).tolist()
    assert sorted(first) == sorted(second) == list(range(train_rows()))
    assert first != second


def test_validation_is_read_in_order_without_shuffling(shards):
    batches = list(make_loader(shards, "validation", 8))
    assert real_ids(batches).tolist() == list(range(sum(map(sum, VALIDATION_FILES))))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_from_a_step_yields_the_rest_of_the_epoch(shards, workers):
    def run(start_step: int) -> list[list[int]]:
        loader = make_loader(
            shards,
            "train",
            16,
            seed=5,
            epoch=2,
            rank=1,
            world_size=2,
            num_workers=workers,
            start_step=start_step,
        )
        batches = [batch["row_id"].tolist() for batch in loader]
        assert len(batches) == len(loader)
        return batches

    full = run(0)
    for start in (1, 3, len(full) // 2, len(full) - 1, len(full)):
        assert run(start) == full[start:], f"resume at {start}"


def test_resume_point_replays_round_robin():
    for counts in ([3, 5], [1, 3, 3], [2, 1, 2], [0, 4], [6], [4, 0, 2]):
        order = [w for step in range(max(counts)) for w in range(len(counts)) if step < counts[w]]
        for steps in range(sum(counts)):
            skips, after = resume_point(counts, steps)
            assert skips == [order[:steps].count(w) for w in range(len(counts))]
            assert after == order[steps]
    with pytest.raises(ShardError, match="past the end"):
        resume_point([1, 2], 4)


def test_empty_shard_set_is_an_error(tmp_path):
    with pytest.raises(ShardError, match="no shard manifest"):
        make_loader(tmp_path, "train", 8)
    empty = write_shards(tmp_path / "empty", {"train": [], "validation": [[3]]})
    with pytest.raises(ShardError, match="no rows"):
        make_loader(empty, "train", 8)
    with pytest.raises(ShardError, match="no rows"):
        make_loader(empty, "test", 8)


def test_a_stale_manifest_is_an_error(tmp_path):
    root = write_shards(tmp_path / "stale", {"train": [[4, 4]]})
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"]["train"][0]["row_groups"] = [5, 3]
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="row group 0 has 4 rows, the manifest says 5"):
        list(make_loader(root, "train", 2, shuffle=False))
    (root / manifest["files"]["train"][0]["path"]).unlink()
    with pytest.raises(ShardError, match="missing"):
        make_loader(root, "train", 2)
