"""The seeder's super-seeding policy: once before twice, and nothing lost to a dead recipient."""

from __future__ import annotations

from distd.swarm.superseed import SuperSeeder

IMG = "a" * 64


def test_each_chunk_once_before_any_twice_while_the_image_is_injected() -> None:
    s = SuperSeeder(window=8, lost_after=30)
    assert s.admit("c1", 0.0, IMG, 2)
    assert not s.admit("c1", 9.0, IMG, 2)  # past the window, but c2 never went out
    assert s.admit("c2", 9.0, IMG, 2)
    assert s.admit("c1", 9.0, IMG, 2)  # every chunk out once: second copies allowed
    assert not s.admit("c1", 10.0, IMG, 2)  # ...but not twice within the window
    assert s.deferred == 2


def test_a_chunk_whose_recipient_vanished_goes_out_again() -> None:
    s = SuperSeeder(window=8, lost_after=30)
    assert s.admit("c1", 0.0, IMG, 3)
    assert not s.admit("c1", 29.0, IMG, 3)
    assert s.admit("c1", 30.0, IMG, 3)


def test_abandoned_transfer_frees_the_chunk_at_once() -> None:
    s = SuperSeeder()
    assert s.admit("c1", 0.0, IMG, 3)
    s.abandoned("c1")
    assert s.admit("c1", 0.1, IMG, 3)


def test_without_an_image_hint_only_the_window_applies() -> None:
    s = SuperSeeder(window=8)
    assert s.admit("c1", 0.0)
    assert not s.admit("c1", 7.9)
    assert s.admit("c1", 8.0)
