"""Messages cross to Ray actors pickled as their class and field values (Record.__reduce__)."""

import dataclasses
import pickle
import sys

import twinloop.agents.knee.messages  # noqa: F401  (its records are Record subclasses too)
import twinloop.agents.messages as messages
from twinloop.agents.messages import Record


def _records(cls: type) -> list[type]:
    """The record classes under ``cls`` (not the classes ``slots=True`` replaced)."""
    out = []
    for sub in cls.__subclasses__():
        if getattr(sys.modules[sub.__module__], sub.__qualname__, None) is sub:
            out.append(sub)
        out += _records(sub)
    return out


def test_every_record_pickles_back_to_an_equal_record():
    """Each field is a positional __init__ field, so class + values rebuild the record."""
    records = _records(Record)
    assert len(records) >= 15
    for cls in records:
        fields = dataclasses.fields(cls)
        assert cls.__match_args__ == tuple(f.name for f in fields), cls
        values = [float(i + 1) for i in range(len(fields))]
        record = cls(*values)
        back = pickle.loads(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
        assert type(back) is cls and back == record


def test_a_record_pickles_without_the_dataclass_state():
    reading = messages.CgmReading(5.0, 123.0)
    assert reading.__reduce_ex__(pickle.HIGHEST_PROTOCOL) == (messages.CgmReading, (5.0, 123.0))
