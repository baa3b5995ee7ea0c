"""The operation log against a plain list of its entries: ``forget_applied`` (issue 20)
drops entries out of the logged order, which ``_trim`` and ``len`` must still account for."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gcollective._oplog import OpLog, Progress

ORIGINS = (1, 2, 3)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(ORIGINS), st.integers(1, 4), st.integers(1, 9)),
        st.tuples(
            st.just("forget"),
            st.dictionaries(st.sampled_from(ORIGINS), st.integers(0, 30), max_size=3),
        ),
        st.tuples(
            st.just("missing"),
            st.dictionaries(st.sampled_from(ORIGINS), st.integers(0, 30), max_size=3),
        ),
    ),
    max_size=60,
)


def _model_missing(
    entries: list[tuple[int, int, int, bytes]], theirs: dict[int, int], ours: dict[int, int]
) -> bool:
    """Whether the kept entries cover, per origin, everything between theirs and ours."""
    for origin, upto in ours.items():
        have = theirs.get(origin, 0)
        covered = {
            seq for o, first, last, _ in entries if o == origin for seq in range(first, last + 1)
        }
        if not set(range(have + 1, upto + 1)) <= covered:
            return False
    return True


@settings(max_examples=300, deadline=None, derandomize=True)
@given(steps, st.integers(0, 60))
def test_the_log_matches_a_list_of_its_entries(steps, max_bytes):
    log = OpLog(max_bytes)
    model: list[tuple[int, int, int, bytes]] = []  # (origin, first, last, frame), oldest first
    next_seq = dict.fromkeys(ORIGINS, 1)
    for step in steps:
        if step[0] == "add":
            _, origin, count, size = step
            first = next_seq[origin]
            next_seq[origin] += count
            frame = bytes([origin]) * size
            log.add(origin, first, first + count - 1, frame)
            model.append((origin, first, first + count - 1, frame))
            while sum(len(e[3]) for e in model) > max_bytes and model:
                model.pop(0)
        elif step[0] == "forget":
            applied = step[1]
            for origin, upto in applied.items():
                own = [e for e in model if e[0] == origin]
                for entry in own:
                    if entry[2] > upto:
                        break
                    model.remove(entry)
            log.forget_applied(applied)
        else:
            ours = {o: next_seq[o] - 1 for o in ORIGINS if next_seq[o] > 1}
            frames = log.missing(step[1], ours)
            assert (frames is not None) == _model_missing(model, step[1], ours)
        assert len(log) == len(model)
        assert log.bytes == sum(len(e[3]) for e in model)
        assert log.ops == sum(e[2] - e[1] + 1 for e in model)


def test_skipping_a_gap_moves_the_vector_to_the_next_hole_only() -> None:
    progress = Progress()
    for seq in (1, 2, 4, 5, 7):
        assert progress.accept(9, seq, seq * 10)
    assert progress.applied[9] == 2 and progress.gaps() == 3
    assert progress.skip_gap(9) == 5  # 3 is lost: 4 and 5 count, 6 is still awaited
    assert progress.stamps[9] == 50 and progress.gap_origins() == [9]
    assert not progress.accept(9, 5, 50)  # a repeat is still recognised
    assert progress.accept(9, 6, 60)  # the next hole fills as before
    assert progress.applied[9] == 7 and not progress.has_gap(9)
