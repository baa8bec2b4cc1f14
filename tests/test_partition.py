"""Slots and partitions: the stored hash, the ranges, and the assignment of a relay group."""

from __future__ import annotations

from collections import Counter

import pytest
from bson import Decimal128, ObjectId
from bson.int64 import Int64

from mongo_outbox._document import build_document
from mongo_outbox._partition import SLOTS, Partition, slot_for
from mongo_outbox._store import assign_missing_slots
from mongo_outbox.relay._membership import assign

# CRC-32 (IEEE) of these UTF-8 bytes, modulo 1024. "123456789" is CRC-32's published check
# value 0xCBF43926; the others are fixed here so that no version may change a key's slot.
VECTORS = [
    ("123456789", 0xCBF43926 % 1024),
    ("order-7", 730),
    ("", 0),
    ("é", 318),
    ("customer/42", 123),
    ("a" * 1024, 953),
]


@pytest.mark.parametrize(("key", "slot"), VECTORS)
def test_slot_of_a_key_is_crc32_modulo_1024(key, slot):
    assert slot_for(key, ObjectId()) == slot


def test_slot_of_an_event_without_key_hashes_its_id():
    assert slot_for(None, ObjectId("65f000000000000000000001")) == 653


def test_emit_stores_the_slot_of_the_key_or_of_the_id():
    keyed = build_document("T", b"x", key="order-7")
    assert keyed["slot"] == 730
    ids = [ObjectId() for _ in range(2000)]
    per_partition = Counter(build_document("T", b"x", event_id=i)["slot"] * 8 // SLOTS for i in ids)
    assert min(per_partition.values()) > 2000 / 8 * 0.8  # keyless events spread evenly


def test_sequential_keys_spread_evenly_over_partitions():
    per_partition = Counter(slot_for(f"key-{i}", ObjectId()) * 8 // SLOTS for i in range(200))
    assert sorted(per_partition) == list(range(8))
    assert min(per_partition.values()) >= 20
    assert max(per_partition.values()) <= 30


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 8, 64, SLOTS])
def test_partitions_cover_every_slot_exactly_once(count):
    parts = [Partition(i, count) for i in range(count)]
    for slot in range(SLOTS):
        assert sum(p.owns(slot) for p in parts) == 1, slot
    sizes = [p.high - p.low for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("odd", [None, "12", -1, SLOTS, 5.5e9, True, [3], [300, 2000]])
def test_documents_without_a_usable_slot_belong_to_partition_0(odd):
    parts = [Partition(i, 4) for i in range(4)]
    assert [p.owns(odd) for p in parts] == [True, False, False, False]


def test_int64_and_double_slots_are_numbers_like_on_the_server():
    assert Partition(3, 4).owns(Int64(1000))
    assert Partition(3, 4).owns(1000.0)


def test_one_partition_keeps_the_relay_state_and_reads_everything():
    whole = Partition()
    assert whole.state_id("default") == "default"
    assert whole.match() == {}
    assert Partition(2, 8).state_id("default") == "default#2/8"


def test_bad_partitions_are_refused():
    with pytest.raises(ValueError, match="between 1 and 1024"):
        Partition(0, 0)
    with pytest.raises(ValueError, match=r"not one of 0\.\.3"):
        Partition(4, 4)


def test_partition_queries_select_what_owns_says(client, db_name):
    """The server's reading of match() is the same as owns(), slot by slot and for odd ones."""
    coll = client[db_name]["slots"]
    odd = [None, "12", -1, SLOTS, 5.5e9, True, Int64(7), 7.0, [3, 2000], [600], Decimal128("700")]
    coll.insert_many([{"_id": i, "slot": s} for i, s in enumerate([*range(SLOTS), *odd])])
    coll.insert_one({"_id": "no-slot"})
    docs = {d["_id"]: d.get("slot", None) for d in coll.find()}
    for count in (1, 3, 8):
        seen: Counter[object] = Counter()
        for index in range(count):
            part = Partition(index, count)
            found = {d["_id"] for d in coll.find(part.match())}
            assert found == {i for i, s in docs.items() if part.owns(s)}
            seen.update(found)
        assert set(seen) == set(docs)
        assert set(seen.values()) == {1}


# -- assignment ------------------------------------------------------------------------------


def test_assignment_is_fair_and_complete():
    for members in (["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]):
        for count in (1, 2, 5, 8, 16):
            owned = assign(members, count)
            flat = sorted(p for ps in owned.values() for p in ps)
            assert flat == list(range(count))
            sizes = sorted(len(ps) for ps in owned.values())
            assert sizes[-1] - sizes[0] <= 1
            assert sizes[-1] <= -(-count // len(members))


def test_assignment_is_the_same_in_every_member_and_order_of_listing():
    assert assign(["b", "a", "c"], 8) == assign(["c", "b", "a"], 8)


def test_a_join_moves_few_partitions():
    before = assign(["a", "b", "c"], 12)
    after = assign(["a", "b", "c", "d"], 12)
    moved = sum(1 for m in "abc" for p in before[m] if p not in after[m])
    assert len(after["d"]) == 3
    assert moved <= 5  # modulo assignment would move 9 of 12


def test_pending_events_written_before_slots_get_the_slot_emit_gives(client, db_name):
    outbox = client[db_name].outbox
    keyed = build_document("T", b"x", key="order-7")
    keyless = build_document("T", b"x")
    published = build_document("T", b"x", key="k")
    published["status"] = "published"
    docs = [keyed, keyless, published, {"_id": "odd", "status": "pending"}]
    outbox.insert_many([{k: v for k, v in d.items() if k != "slot"} for d in docs])
    assert assign_missing_slots(outbox) == 2
    slots = {d["_id"]: d.get("slot") for d in outbox.find()}
    assert slots == {
        keyed["_id"]: 730,
        keyless["_id"]: keyless["slot"],
        published["_id"]: None,
        "odd": None,
    }
    assert assign_missing_slots(outbox) == 0
