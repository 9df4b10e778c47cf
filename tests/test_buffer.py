"""The feature buffer: held-out rows keep their share of the memory, rows come back in order."""
import torch

from runtime.buffer import CALIB, TRAIN, FeatureBuffer

ROW_BYTES = 2 * 4 + 4 * 3 + 2   # one exit of 4 features, 3 classes


def _buffer(capacity: int, share: float = 0.5) -> FeatureBuffer:
    buf = FeatureBuffer([4], 3, capacity * ROW_BYTES / 2 ** 20, share)
    assert buf.capacity == capacity
    return buf


def _add(buf, first: int, n: int, role: int):
    """Rows first .. first + n - 1, each row's features its own number (below 2048: float16
    holds it exactly)."""
    t = torch.arange(first, first + n, dtype=torch.float32)
    buf.add([t[:, None].repeat(1, 4)], t[:, None].repeat(1, 3), torch.full((n,), role))


def _held(buf, role, limit=0):
    feats, teacher = buf.snapshot(role, limit)
    assert torch.equal(feats[0][:, 0], teacher[:, 0]), "a row's features and teacher stay paired"
    return feats[0][:, 0].long().tolist()


def test_training_rows_never_push_out_held_out_rows_below_their_share():
    buf = _buffer(200, share=0.5)
    _add(buf, 0, 60, CALIB)
    for start in range(100, 1100, 16):           # requests of training rows, 5x the capacity
        _add(buf, start, 16, TRAIN)
    assert _held(buf, CALIB) == list(range(60)), "the held-out rows are all still there"
    assert _held(buf, TRAIN) == list(range(1108 - 140, 1108))
    assert buf.size == buf.capacity == 200

    # held-out rows take the oldest training rows' slots up to their share (40 more), then
    # replace the oldest held-out rows
    _add(buf, 1500, 100, CALIB)
    assert buf.count(CALIB) == 100 and buf.count(TRAIN) == 100
    assert _held(buf, CALIB) == list(range(1500, 1600))
    assert _held(buf, TRAIN) == list(range(1108 - 100, 1108)), "the oldest training rows went"


def test_snapshot_gives_the_most_recent_rows_in_arrival_order():
    buf = _buffer(100)
    for start in range(0, 400, 10):              # the buffer wraps several times
        _add(buf, start, 10, TRAIN if start % 20 else CALIB)
    calib = _held(buf, CALIB)
    assert calib == sorted(calib) and calib[-1] == 389
    assert _held(buf, CALIB, limit=15) == calib[-15:]
    assert _held(buf, TRAIN, limit=5) == [395, 396, 397, 398, 399]
    buf.clear()
    assert buf.size == 0 and _held(buf, TRAIN) == [] and buf.count(CALIB) == 0


def test_a_batch_larger_than_the_buffer_keeps_its_latest_rows():
    buf = _buffer(64, share=0.25)
    _add(buf, 0, 500, TRAIN)
    assert _held(buf, TRAIN) == list(range(436, 500))
    _add(buf, 1000, 100, CALIB)
    assert _held(buf, CALIB) == list(range(1084, 1100)), "held-out rows fill their share"
    assert _held(buf, TRAIN) == list(range(452, 500))


def test_rows_added_while_a_snapshot_copies_never_reach_it_torn_or_in_the_wrong_role():
    """The copy runs outside the lock: rows that reuse slots meanwhile (training rows over
    training rows, held-out rows over training rows) are left out, never mixed in."""
    buf = _buffer(100, share=0.5)
    _add(buf, 0, 100, TRAIN)                     # full: every new row reuses a slot
    copy = buf._copy

    def racing_copy(sel):
        feats, teacher = copy(sel)
        _add(buf, 1000, 10, TRAIN)               # reuse the slots of rows 0-9 ...
        _add(buf, 2000, 5, CALIB)                # ... and of rows 10-14, now held out
        feats[0][:3] = -1.0                      # what a torn read of those slots could hold
        return feats, teacher

    buf._copy = racing_copy
    assert _held(buf, TRAIN) == list(range(15, 100)), "overwritten slots are left out"
    buf._copy = copy
    assert _held(buf, CALIB) == list(range(2000, 2005))

    def clearing_copy(sel):
        out = copy(sel)
        buf.clear()
        return out

    buf._copy = clearing_copy
    assert _held(buf, TRAIN) == [], "a snapshot that a clear overtook is empty"
