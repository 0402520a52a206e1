import json

import pytest

from aloe_cli.data.records import RecordDefaults, modality, normalize, validate
from aloe_cli.errors import RecordError
from support import chat


def test_trl_records_pass_through_untouched():
    record = chat("Which organ?", "The liver.", ["a.png"], id="x1", source="slake", extra={"k": [1, 2]})
    before = repr(record)
    assert normalize(record) is record
    assert repr(record) == before
    assert modality(record) == "multimodal"
    assert modality(chat("q", "a")) == "text"


@pytest.mark.parametrize("record, reason, field", [
    ({"images": []}, "missing_field", "messages"),
    ({"messages": []}, "invalid_field", "messages"),
    ({"messages": [{"role": "doctor", "content": "hi"}]}, "invalid_field", "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "invalid_field", "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "invalid_field",
     "messages[0].content[0].text"),
    (chat("q", "a", ["a.png", "b.png"]) | {"images": ["a.png"]}, "image_count_mismatch", "images"),
    (chat("q", "a") | {"images": ["a.png"]}, "image_count_mismatch", "images"),
    (chat("q", "a") | {"domain": "veterinary"}, "invalid_field", "domain"),
])
def test_validation_names_reason_and_field(record, reason, field):
    with pytest.raises(RecordError) as info:
        validate(record)
    assert info.value.reason == reason
    assert info.value.field == field
    assert field in str(info.value)


def test_sharegpt_with_image_markers():
    raw = {"id": "llava-1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Black."}]}
    record = normalize(raw, RecordDefaults(source="llava"))
    assert record["images"] == ["coco/1.jpg"]
    assert record["source"] == "llava" and record["id"] == "llava-1"
    assert "conversations" not in record and "image" not in record
    assert record["messages"][0] == {"role": "user",
                                     "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]


def test_sharegpt_without_markers_puts_images_first_and_keeps_marker_count_honest():
    raw = {"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Compare."},
                                                          {"from": "gpt", "value": "Same."}]}
    record = normalize(raw)
    assert [p["type"] for p in record["messages"][0]["content"]] == ["image", "image", "text"]
    bad = {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image><image> two?"},
                                                   {"from": "gpt", "value": "no"}]}
    with pytest.raises(RecordError) as info:
        normalize(bad)
    assert info.value.reason == "image_count_mismatch"


def test_question_answer_columns():
    record = normalize({"question": "Is there a fracture?", "answer": "No.", "image_path": "x.png", "id": 7})
    assert record["images"] == ["x.png"]
    assert record["messages"][1]["content"][0]["text"] == "No."
    assert record["id"] == 7


def test_unknown_shape_is_a_missing_messages_error():
    with pytest.raises(RecordError) as info:
        normalize({"text": "hello"})
    assert info.value.field == "messages"
    with pytest.raises(RecordError):
        normalize(["not", "an", "object"])


# ----------------------------------------------------------------------------- normalisation on read

@pytest.fixture
def image_dir(tmp_path):
    from support import scan

    scan(4, size=128).resize((400, 200)).save(tmp_path / "a.png")
    return tmp_path


def test_source_and_domain_are_filled_in_only_where_missing():
    defaults = RecordDefaults(source="file-stem", domain="general")
    bare = normalize(chat("q", "a"), defaults)
    assert (bare["source"], bare["domain"]) == ("file-stem", "general")
    own = normalize(chat("q", "a", source="slake", domain="medical"), defaults)
    assert (own["source"], own["domain"]) == ("slake", "medical")
    sharegpt = normalize({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, defaults)
    assert (sharegpt["source"], sharegpt["domain"]) == ("file-stem", "general")
    with pytest.raises(ValueError):
        RecordDefaults(domain="veterinary")
    with pytest.raises(ValueError):
        RecordDefaults(bbox_format="cxcywh")


def test_region_annotations_become_grounding_text_on_read_once(image_dir):
    raw = {"question": "<image>\nWhere is the nodule?", "image": "a.png",
           "objects": [{"bbox": [40, 20, 160, 80], "label": "nodule"}]}
    record = normalize(raw, RecordDefaults(bbox_format="xywh"), image_dir)
    box = "<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"
    assert record["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": box}]}
    assert record["aloe"]["grounding"]["bbox_format"] == "xywh"
    again = normalize(json.loads(json.dumps(record)), RecordDefaults(), image_dir)  # the next stage of a pipe
    assert again == record


def test_a_bad_box_is_a_record_error_and_leaves_the_record_alone(image_dir):
    raw = chat("Where?", "Here.", ["a.png"], objects=[{"bbox": [0, 0, 500, 100]}])
    before = json.dumps(raw)
    with pytest.raises(RecordError) as info:
        normalize(raw, RecordDefaults(source="s"), image_dir)
    assert (info.value.reason, info.value.field) == ("bbox_outside_image", "objects[0].bbox")
    assert json.dumps(raw) == before


def test_null_aloe_from_parquet_is_dropped():
    record = normalize(chat("q", "a", aloe=None))
    assert "aloe" not in record
