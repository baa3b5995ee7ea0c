"""JSON logs from gcollective: one object per line, with the member's id, the peer's address
and the reason of a failure as fields (see docs/operations.rst).

    python examples/json_logging.py 127.0.0.1:7001 127.0.0.1:7002

runs a member at the first address with the others as peers until interrupted.
"""

import json
import logging
import sys

from gevent import monkey

monkey.patch_all()

import gcollective  # noqa: E402


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object; gcollective's records carry node_id, peer, reason."""

    FIELDS = ("node_id", "peer", "reason")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            entry[field] = getattr(record, field, None)
        return json.dumps(entry)


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.DEBUG, handlers=[handler])
    local, *peers = sys.argv[1:]
    gcollective.start(local, peers, timeout=1)
    try:
        import gevent

        gevent.sleep(float("inf"))
    except KeyboardInterrupt:
        gcollective.stop()


if __name__ == "__main__":
    main()
