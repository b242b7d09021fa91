"""The PII benchmark's scoring: overlap and exact matching, the acted-on average, the split."""

from __future__ import annotations

from benchmarks.eval_pii import score_records, split_of


def record(text: str, *spans: tuple[str, str]) -> dict[str, object]:
    out = []
    for label, value in spans:
        start = text.index(value)
        out.append(
            {
                "entity_type": label,
                "entity_value": value,
                "start_position": start,
                "end_position": start + len(value),
            }
        )
    return {"full_text": text, "spans": out}


def test_overlap_and_exact_scores_and_the_average_over_acted_on_entities() -> None:
    text = "Call Ann Lee at 555-0100, 12 Main Street."
    rec = record(
        text,
        ("PERSON", "Ann Lee"),
        ("PHONE_NUMBER", "555-0100"),
        ("STREET_ADDRESS", "12 Main Street"),
    )
    at = text.index
    predicted = [
        ("PERSON", at("Ann"), at("Ann") + 3),  # overlaps, not exact
        ("PHONE_NUMBER", at("555"), at("555") + 8),  # exact
        ("PHONE_NUMBER", at("12"), at("12") + 2),  # wrong
    ]
    covered = {"PERSON", "PHONE_NUMBER", "STREET_ADDRESS"}
    scores = score_records([rec], [predicted], covered, acted={"PHONE_NUMBER", "STREET_ADDRESS"})

    overlap, exact = scores["overlap"], scores["exact"]
    assert overlap["PERSON"]["recall"] == 1.0
    assert exact["PERSON"]["recall"] == 0.0
    assert overlap["PHONE_NUMBER"]["precision"] == 0.5
    assert overlap["STREET_ADDRESS"]["recall"] == 0.0
    assert overlap["overall"]["support"] == 3
    assert overlap["overall"]["recall"] == 2 / 3
    assert overlap["overall_acted"]["support"] == 2
    assert overlap["overall_acted"]["recall"] == 0.5


def test_the_split_is_stable_and_about_half() -> None:
    records = [{"full_text": f"record number {i}"} for i in range(1000)]
    splits = [split_of(r) for r in records]
    assert splits == [split_of(r) for r in records]
    assert 400 < splits.count("dev") < 600
    assert set(splits) == {"dev", "test"}
