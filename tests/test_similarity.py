"""What makes the embedding a similarity space: subword ids (one definition in Spark, in the
shards, the loader and the served encoder), the subword bag, the contrastive views and loss.
Small data, real Spark, real training steps."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from pyspark.sql import functions as SF

from models.bag import SubwordBag, distinct_counts
from models.encoders import TitleEncoder, pack_title
from models.mrnet import MRNet
from pipelines.data.shards import load_manifest, title_terms
from pipelines.data.subwords import Subwords, xxh64, xxh64_many
from pipelines.data.tokenizer import Vocabulary, tokenize_arrow
from pipelines.model_types.registry import model_type
from pipelines.training.contrastive import ContrastiveSpec, info_nce, join_views, view
from pipelines.training.loader import make_loader

STRINGS = ["", "a", "<a>", "abc", "<sf1008d>", "elp", "<elplp12>", "é", "日本語", "x" * 31,
           "y" * 32, "z" * 45, "<" + "long" * 20 + ">"]  # fmt: skip


def test_xxh64_matches_the_reference_vectors_and_spark(spark):
    assert xxh64(b"", 0) == 0xEF46DB3751D8E999 and xxh64(b"abc", 0) == 0x44BC2CF5AD770999
    ours = xxh64_many(STRINGS)
    assert [int(h) for h in ours] == [xxh64(s.encode()) for s in STRINGS]  # vectorised = scalar
    frame = spark.createDataFrame([(s,) for s in STRINGS], "s string")
    spark_hashes = [row[0] for row in frame.select(SF.xxhash64("s")).collect()]
    assert [h % (1 << 64) for h in spark_hashes] == [int(h) for h in ours]
    buckets = [row[0] for row in frame.select(SF.pmod(SF.xxhash64("s"), SF.lit(1 << 18))).collect()]
    assert buckets == [int(h % (1 << 18)) for h in ours]  # Spark SQL can compute the ids too


def test_grams_ids_width_and_padding():
    scheme = Subwords(buckets=1 << 10, per_word=6, max_tokens=3, width=10)
    assert scheme.grams("ab") == ["<ab>", "<ab", "ab>"]  # the whole token once
    assert scheme.grams("sf1008d")[:3] == ["<sf1008d>", "<sf", "sf1"]
    assert len(scheme.grams("sf1008d")) == 6  # per_word
    docs = pa.array([["ab", "cd"], [], None, ["ab", "cd", "ef", "gh"]], pa.list_(pa.string()))
    ids = scheme.encode(docs)
    assert ids.shape == (4, 10) and ids.dtype == np.int64
    assert (ids[0, :6] > 0).all() and (ids[0, 6:] == 0).all()  # 3 + 3 ids, then padding
    assert not ids[1].any() and not ids[2].any()
    assert (ids[3, :9] > 0).all() and ids[3, 9] == 0  # the first max_tokens tokens only
    narrow = Subwords(buckets=1 << 10, per_word=6, max_tokens=3, width=4).encode(docs)
    np.testing.assert_array_equal(narrow[0], ids[0, :4])  # cut at width
    assert ((ids >= 0) & (ids <= 1 << 10)).all()
    np.testing.assert_array_equal(ids[3, :6], ids[0, :6])  # same tokens, same ids


def test_distinct_counts_per_row():
    ids = torch.tensor([[5, 3, 5, 0, 5], [0, 0, 0, 0, 0], [7, 7, 2, 0, 0]])
    rows, distinct, counts = distinct_counts(ids)
    found = sorted(zip(rows.tolist(), distinct.tolist(), counts.tolist(), strict=True))
    assert found == [(0, 3, 1), (0, 5, 3), (2, 2, 1), (2, 7, 2)]


def test_the_bag_weighs_distinct_ids_by_idf_and_sublinear_tf():
    torch.manual_seed(0)
    bag = SubwordBag(6, np.array([11, 40]), 4, word_idf=np.arange(6.0),
                     subword_idf=np.array([1.0, 2.0, 3.0]))  # fmt: skip
    batch = {"title_ids": torch.tensor([[2, 2, 3, 0]]),
             "title_subwords": torch.tensor([[40, 99, 11, 0, 40, 20]])}  # fmt: skip
    expected = (
        2 * (1 + np.log(2)) * bag.words.weight[2]
        + 3 * bag.words.weight[3]
        + 3 * (1 + np.log(2)) * bag.subwords.weight[2]
        + 2 * bag.subwords.weight[1]
    )
    assert torch.allclose(bag(batch)[0], F.normalize(expected, dim=0), atol=1e-6)  # 20, 99: unknown
    # Padding and unknown subword ids change nothing.
    padded = {key: torch.cat((value, torch.zeros(1, 5, dtype=torch.int64)), 1)
              for key, value in batch.items()}  # fmt: skip
    assert torch.allclose(bag(padded), bag(batch), atol=1e-6)


def test_views_are_deterministic_by_seed_and_keep_labels():
    spec = ContrastiveSpec(1.0, 0.15, 0.3, 0.2, seed=0)
    batch = {
        "title_ids": torch.arange(2, 42).reshape(4, 10),
        "title_subwords": torch.arange(1, 81).reshape(4, 20),
        "label": torch.arange(4),
    }
    first = view(batch, spec, torch.Generator().manual_seed(7))
    again = view(batch, spec, torch.Generator().manual_seed(7))
    other = view(batch, spec, torch.Generator().manual_seed(8))
    assert all(torch.equal(first[k], again[k]) for k in batch)
    assert not torch.equal(first["title_subwords"], other["title_subwords"])
    assert torch.equal(first["label"], batch["label"])
    dropped = (first["title_subwords"] == 0).float().mean().item()
    assert 0.15 < dropped < 0.45  # about subword_dropout
    assert ((first["title_subwords"] == 0) | (first["title_subwords"] == batch["title_subwords"])
            ).all()  # fmt: skip
    joined = join_views(first, other)
    assert joined["title_ids"].shape == (8, 10)


def test_info_nce_leaves_padding_rows_out():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    real = torch.tensor([True, True, True, True, False, False])
    assert torch.allclose(info_nce(a, b, 0.2, real), info_nce(a[:4], b[:4], 0.2, real[:4]))
    lonely = info_nce(a.requires_grad_(), b, 0.2, torch.zeros(6, dtype=torch.bool))
    assert lonely.item() == 0.0 and lonely.requires_grad


@pytest.fixture(scope="module")
def sharded(small_shards):
    """The shared 800-row catalog through clean, corpus and shard (conftest `small_shards`)."""
    return small_shards


def test_subword_ids_are_one_definition_in_shard_loader_and_served_encoder(sharded):
    """The shard stage's Spark column, the loader's batches and what the embed stage feeds
    the served encoder (`model_type.inputs`) hold the same ids for the same products."""
    config = sharded
    root = config.outputs.shards
    manifest = load_manifest(root)
    assert manifest["subwords"]["width"] == 96
    table = pa.concat_tables(pq.read_table(root / f["path"]) for f in manifest["files"]["test"])
    catalog = pq.read_table(config.outputs.clean_catalog, columns=["product_id", "title"])
    titles = dict(zip(catalog.column(0).to_pylist(), catalog.column(1).to_pylist(), strict=True))
    ordered = [titles[p] for p in table.column("product_id").to_pylist()]
    scheme = Subwords(
        **{
            k: manifest["subwords"][k]
            for k in ("buckets", "n_min", "n_max", "per_word", "max_tokens", "width")
        }
    )
    in_python = scheme.encode(tokenize_arrow(ordered))
    in_shards = np.stack(table.column("title_subwords").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(in_shards, in_python)
    batches = list(make_loader(root, "test", 1000, shuffle=False))
    np.testing.assert_array_equal(batches[0]["title_subwords"].numpy(), in_shards)
    vocabulary = Vocabulary.load(root / manifest["vocabulary"]["path"])
    title_length = config.shard.text_fields["title"]
    layout = model_type("mrnet").input_layout(
        TitleEncoder(torch.nn.Module(), title_length, 96), {"subwords": manifest["subwords"]}
    )  # type: ignore[arg-type]
    served = model_type("mrnet").inputs(layout, pa.RecordBatch.from_pydict({"title": ordered}),
                                        vocabulary)  # fmt: skip
    np.testing.assert_array_equal(served, pack_title(batches[0]["title_ids"].numpy(), in_shards))


def test_title_terms_count_documents_per_id(sharded):
    root = sharded.outputs.shards
    manifest = load_manifest(root)
    terms = title_terms(root, manifest)
    assert terms.documents == sum(manifest["splits"].values())
    assert (np.diff(terms.subword_ids) > 0).all() and (terms.subword_df >= 1).all()
    assert terms.word_df.max() <= terms.documents and terms.word_df[0] == 0  # padding never
    assert terms.idf(np.array([0]))[0] > terms.idf(np.array([terms.documents]))[0]


def test_contrastive_training_pulls_views_of_a_product_together(sharded):
    """A few hundred steps of the objective alone: two noised views of one product end closer
    to each other than to other products, and the loss falls."""
    config = sharded
    root = config.outputs.shards
    torch.manual_seed(0)
    build = model_type("mrnet").factory(config, config.outputs.word2vec)  # vectors unused: bag
    network: MRNet = build(root, [])
    spec = ContrastiveSpec(1.0, 0.15, 0.3, 0.0, seed=0)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    batches = list(make_loader(root, "train", 128, seed=0))
    generator = torch.Generator().manual_seed(0)

    def margin(batch) -> float:
        with torch.no_grad():
            a = network.encode(view(batch, spec, generator))
            b = network.encode(view(batch, spec, generator))
        similarity = a @ b.T
        return (similarity.diagonal().mean() - similarity.mean()).item()

    probe = batches[0]
    before, losses = margin(probe), []
    for _ in range(15):
        for batch in batches:
            joined = join_views(view(batch, spec, generator), view(batch, spec, generator))
            embedding = network(joined)["embedding"]
            rows = len(batch["row_id"])
            loss = info_nce(embedding[:rows], embedding[rows:], 0.15, batch["row_id"] >= 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert np.mean(losses[-len(batches) :]) < 0.7 * np.mean(losses[: len(batches)])
    assert margin(probe) > before + 0.1
