import base64
import gzip
import json

import pytest
from PIL import Image

from aloe_cli.data.images import load_image
from aloe_cli.data.io import RecordWriter, read_items
from aloe_cli.errors import AloeError
from support import chat, jpeg_bytes, read_jsonl, scan, write_jsonl


def records_of(items):
    return [item.record for item in items]


def test_jsonl_and_gzip_read_identically(tmp_path):
    records = [chat(f"q{i}", f"a{i}", id=str(i)) for i in range(5)]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    zipped = tmp_path / "a.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    expected = [{**record, "source": "a"} for record in records]  # records without a source get the file's name
    assert records_of(read_items([str(plain)])) == expected
    assert records_of(read_items([str(zipped)])) == expected


def test_jsonl_errors_are_items_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n{not json\n\n" + json.dumps({"no": "messages"}) + "\n")
    items = list(read_items([str(path)]))
    assert [i.error is None for i in items] == [True, False, False]
    assert items[1].error.reason == "invalid_json" and items[1].where.endswith("bad.jsonl:2")
    assert items[2].error.reason == "missing_field" and items[2].where.endswith("bad.jsonl:4")


def test_globs_missing_inputs_and_unknown_formats(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [chat("q", name)])
    assert len(list(read_items([str(tmp_path / "*.jsonl")]))) == 2
    with pytest.raises(AloeError, match="matches no file"):
        list(read_items([str(tmp_path / "*.parquet")]))
    with pytest.raises(AloeError, match="input not found"):
        list(read_items([str(tmp_path / "nope.jsonl")]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(AloeError, match="unknown input format"):
        list(read_items([str(tmp_path / "x.csv")]))


def test_relative_images_resolve_against_the_input_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    scan(1).save(tmp_path / "imgs" / "x.png")
    write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", ["imgs/x.png"])])
    item = next(read_items([str(tmp_path / "d.jsonl")]))
    assert load_image(item.record["images"][0], item.image_root).size == (128, 128)


def test_parquet_round_trip_with_embedded_image_bytes(tmp_path):
    png = tmp_path / "x.png"
    scan(2).save(png)
    records = [chat("q", "a", ["data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(scan(3))).decode()], id="1"),
               chat("q2", "a2", [str(png)], id="2", aloe={"score": {"value": 4}}),
               chat("text only", "yes", id="3")]
    out = tmp_path / "out.parquet"
    with RecordWriter(out) as writer:
        for record in records:
            writer.write(record)
    back = records_of(read_items([str(out)]))
    assert [r["id"] for r in back] == ["1", "2", "3"]
    assert back[0]["images"][0]["bytes"][:2] == b"\xff\xd8"  # HF Image struct {bytes, path}
    assert back[1]["images"][0]["path"] == str(png) and back[1]["aloe"]["score"]["value"] == 4
    assert back[2]["images"] == []
    assert load_image(back[0]["images"][0]).size == (128, 128)
    # and back to JSONL, bytes become data URIs
    out_jsonl = tmp_path / "again.jsonl"
    with RecordWriter(out_jsonl) as writer:
        writer.write(back[0])
    assert read_jsonl(out_jsonl)[0]["images"][0].startswith("data:image/jpeg;base64,")


def test_hf_dataset_folder_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [scan(i) for i in range(3)]
    ds = datasets.Dataset.from_dict({
        "messages": [chat("q", f"a{i}", ["x"])["messages"] for i in range(3)],
        "images": [[image] for image in images],
        "source": ["s"] * 3,
    }).cast_column("images", datasets.Sequence(datasets.Image()))
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    back = records_of(read_items([str(tmp_path / "ds")]))
    assert [r["messages"][1]["content"][0]["text"] for r in back] == ["a0", "a1", "a2"]
    assert load_image(back[1]["images"][0]).size == (128, 128)
    assert len(list(read_items([str(tmp_path / "dd")]))) == 4
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(AloeError, match="save_to_disk"):
        list(read_items([str(tmp_path / "plain_folder")]))


def write_tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_vlmevalkit_tsv_base64_references_options_and_image_path(tmp_path):
    b64 = base64.b64encode(jpeg_bytes(scan(5))).decode()
    scan(6).save(tmp_path / "p.png")
    tsv = write_tsv(tmp_path / "bench.tsv", ["index", "image", "question", "A", "B", "C", "answer", "category"], [
        [0, b64, "Abnormal?", "yes", "no", "nan", "A", "cls"],
        [1, "0", "Which side?", "left", "right", "", "B", "side"],  # refers to row 0's image
        [2, str([b64, b64]), "Same image twice?", "yes", "no", "", "A", "multi"],
    ])
    items = list(read_items([str(tsv)]))
    assert all(item.error is None for item in items)
    first, second, third = (item.record for item in items)
    assert first["id"] == "0" and first["source"] == "bench"
    assert first["images"][0].startswith("data:image/jpeg;base64,")
    assert second["images"] == first["images"]
    assert len(third["images"]) == 2
    assert first["messages"][0]["content"][-1]["text"] == "Abnormal?\nOptions:\nA. yes\nB. no"
    assert first["meta"]["options"] == {"A": "yes", "B": "no"} and first["meta"]["category"] == "cls"
    assert first["messages"][1]["content"][0]["text"] == "A"
    assert load_image(first["images"][0]).size == (128, 128)
    path_tsv = write_tsv(tmp_path / "paths.tsv", ["index", "image_path", "question"], [[7, "p.png", "What?"]])
    record = next(read_items([str(path_tsv)])).record
    assert record["images"] == ["p.png"]


def test_tsv_missing_columns_and_dangling_reference(tmp_path):
    tsv = write_tsv(tmp_path / "nocol.tsv", ["index", "image"], [[0, "abc"]])
    with pytest.raises(AloeError, match=r"nocol.tsv.*missing column\(s\): question"):
        list(read_items([str(tsv)]))
    dangling = write_tsv(tmp_path / "dangling.tsv", ["index", "image", "question"], [[0, "9", "q"]])
    item = next(read_items([str(dangling)]))
    assert item.error.reason == "image_missing" and item.where.endswith("dangling.tsv:2")


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with RecordWriter(out) as writer:
            writer.write(chat("q", "a"))
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with RecordWriter(tmp_path / "out.jsonl.gz") as writer:
        writer.write(chat("q", "a"))
    assert json.loads(gzip.decompress((tmp_path / "out.jsonl.gz").read_bytes()))["messages"][1]["role"] == "assistant"
    with pytest.raises(AloeError, match="unknown output format"):
        RecordWriter(tmp_path / "out.csv")
    with pytest.raises(AloeError, match="output folder does not exist"):
        RecordWriter(tmp_path / "nope" / "out.jsonl").__enter__()


def test_parquet_unifies_schemas_across_chunks(tmp_path):
    out = tmp_path / "mixed.parquet"
    with RecordWriter(out) as writer:
        for i in range(5000):
            extra = {"aloe": {"score": {"value": i % 5}}} if i > 4000 else {}
            writer.write(chat(f"q{i}", "a", id=str(i), **extra))
    back = records_of(read_items([str(out)]))
    assert len(back) == 5000 and back[4500]["aloe"]["score"]["value"] == 0 and back[0].get("aloe") is None
    assert Image  # PIL imported for the helpers
