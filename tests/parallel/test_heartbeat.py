"""The heartbeat file is written by the training loop at every step and by the watchdog's thread
every few seconds: concurrent writes must never fail (a failing write ended the demo run at a
step boundary) and a reader always sees a whole record."""

import json
import threading

from qvl_train.parallel.heartbeat import Heartbeat


def test_concurrent_writes_never_fail_and_leave_a_whole_record(tmp_path):
    beat = Heartbeat(tmp_path, rank=0, world_size=1)
    errors = []

    def hammer(steps):
        try:
            for step in steps:
                beat.set_step(step)
                beat.write()
        except Exception as e:  # noqa: BLE001 (collected for the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(range(i, 400, 4),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert json.loads(beat.path.read_text())["rank"] == 0
    assert not list(beat.dir.glob("*.tmp"))
