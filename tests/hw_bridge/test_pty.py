"""Pty pairs own their socat: links never replace an existing path, socat is reaped on close and
outlives the thread that made the pair (it dies with the process: tests/e2e/test_rig_recovery)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import serial

from tests.processes import running
from twinloop.hw_bridge.errors import BridgeError
from twinloop.hw_bridge.pty import PtyPair


def test_a_link_onto_an_existing_file_is_refused_and_the_file_kept(tmp_path):
    target = tmp_path / "data.csv"
    target.write_text("a,b\n1,2\n")
    with pytest.raises(BridgeError, match=r"data\.csv: already exists"):
        PtyPair(links=(str(target), None))
    assert target.read_text() == "a,b\n1,2\n" and not target.is_symlink()


def test_a_link_onto_a_directory_or_a_live_pair_is_refused(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(BridgeError, match="already exists"):
        PtyPair(links=(str(tmp_path / "dir"), None))
    with PtyPair(tmp_path) as live:
        with pytest.raises(BridgeError, match="already exists"):
            PtyPair(links=(live.a, None))
        assert live.alive and os.path.exists(live.a)  # the other pair keeps its link


def test_a_dangling_link_left_by_a_killed_socat_is_replaced(tmp_path):
    link = tmp_path / "tty"
    link.symlink_to(tmp_path / "gone")
    with PtyPair(links=(str(link), None)) as pair:
        assert pair.alive and os.path.realpath(link).startswith("/dev/pts/")


def test_socat_outlives_the_thread_that_made_the_pair_and_is_reaped_on_close(tmp_path):
    made: list[PtyPair] = []
    maker = threading.Thread(target=lambda: made.append(PtyPair(tmp_path)))
    maker.start()
    maker.join()
    pair = made[0]
    try:
        assert pair.alive  # the kernel ties socat's death signal to a thread of this module
        with serial.Serial(pair.a, timeout=1) as a, serial.Serial(pair.b, timeout=1) as b:
            a.write(b"ping")
            assert b.read(4) == b"ping"
    finally:
        pair.close()
    assert not running(pair.pid)  # ended and reaped: no zombie left
    assert not os.path.lexists(pair.a)


def test_a_forked_child_makes_its_own_pairs(tmp_path):
    """A fork copies no spawner thread: the child starts its own instead of waiting forever."""
    with PtyPair(tmp_path) as parent:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            signal.alarm(10)  # a hang ends the child with SIGALRM, which the parent sees
            try:
                with PtyPair() as child:
                    os._exit(0 if child.alive else 3)
            finally:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert parent.alive
    assert os.waitstatus_to_exitcode(status) == 0
